// fastllm._C.ops: the kernels over tensors passed in as DLPack views (torch tensors go straight in,
// zero-copy). Every array is checked for dtype, device and layout here; the kernels then see raw
// pointers. CUDA tensors dispatch to the CUDA kernels on the given stream (an int, e.g.
// torch.cuda.current_stream().cuda_stream). fp8 e4m3 KV caches are passed as uint8 views.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <string>

#include "array_args.h"
#include "fastllm/kernels/activation.h"
#include "fastllm/kernels/attention.h"
#include "fastllm/kernels/cache_ops.h"
#include "fastllm/kernels/common.h"
#include "fastllm/kernels/fp8_gemm.h"
#include "fastllm/kernels/lora.h"
#include "fastllm/kernels/moe.h"
#include "fastllm/kernels/norm.h"
#include "fastllm/kernels/quant_gemm.h"
#include "fastllm/kernels/rotary.h"
#include "fastllm/kernels/sampling.h"

namespace nb = nanobind;
namespace k = fastllm::kernels;

namespace {

using namespace fastllm::bindings;  // NOLINT: the argument checks

void* stream_ptr(uintptr_t stream) { return reinterpret_cast<void*>(stream); }

// True for a CUDA tensor (the build must have the CUDA kernels), false for a CPU one.
// Runs k::<op>_cpu(p), or k::<op>_cuda(p, stream) for device tensors, with the GIL released.
// cuda_device() has already refused device tensors when the build has no CUDA kernels.
#ifdef FASTLLM_WITH_CUDA
#define FASTLLM_RUN_OP(op, cuda, p, stream) \
  do {                                      \
    nb::gil_scoped_release release_gil;     \
    if (cuda) {                             \
      k::op##_cuda(p, stream_ptr(stream));  \
    } else {                                \
      k::op##_cpu(p);                       \
    }                                       \
  } while (0)
#else
#define FASTLLM_RUN_OP(op, cuda, p, stream) \
  do {                                      \
    (void)(stream);                         \
    nb::gil_scoped_release release_gil;     \
    if (!(cuda)) k::op##_cpu(p);            \
  } while (0)
#endif

bool cuda_device(const Array& a, const char* op) {
  const bool cuda = is_cuda(a);
  check_arg(cuda || a.device_type() == nb::device::cpu::value,
            std::string(op) + ": tensors must be on the CPU or a CUDA device");
  check_arg(!cuda || k::built_with_cuda(), std::string(op) + ": this build has no CUDA kernels");
  return cuda;
}

// ---- cache ops --------------------------------------------------------------------------------

void reshape_and_cache(const Array& key, const Array& value, const Array& key_cache,
                       const Array& value_cache, const Array& slot_mapping, float k_scale,
                       float v_scale, uintptr_t stream, const std::string& fp8) {
  const char* op = "reshape_and_cache";
  const bool cuda = cuda_device(key, op);
  k::ReshapeAndCacheParams p;
  check_arg(key.ndim() == 3 && value.ndim() == 3,
            where(op, "key/value must be [tokens, kv_heads, head_size]"));
  check_arg(key_cache.ndim() == 4 && value_cache.ndim() == 4,
            where(op, "caches must be [num_blocks, block_size, kv_heads, head_size]"));
  for (const Array* a : {&value, &key_cache, &value_cache}) check_device(*a, cuda, op, "tensor");
  p.dtype = float_dtype(key, op, "key");
  check_arg(float_dtype(value, op, "value") == p.dtype, where(op, "key and value dtypes differ"));
  const k::DType fp8_type = fp8_format(fp8, op);
  p.cache_dtype = float_dtype(key_cache, op, "key_cache", fp8_type);
  check_arg(float_dtype(value_cache, op, "value_cache", fp8_type) == p.cache_dtype,
            where(op, "key_cache and value_cache dtypes differ"));
  check_dense_from(key, 1, op, "key");
  check_dense_from(value, 1, op, "value");
  check_contiguous(key_cache, op, "key_cache");
  check_contiguous(value_cache, op, "value_cache");
  p.num_tokens = key.shape(0);
  p.num_kv_heads = key.shape(1);
  p.head_size = key.shape(2);
  p.num_blocks = key_cache.shape(0);
  p.block_size = key_cache.shape(1);
  for (size_t d = 0; d < 4; ++d)
    check_arg(key_cache.shape(d) == value_cache.shape(d), where(op, "cache shapes differ"));
  check_arg(value.shape(0) == key.shape(0) && value.shape(1) == key.shape(1) &&
                value.shape(2) == key.shape(2),
            where(op, "key and value shapes differ"));
  check_arg(key_cache.shape(2) == p.num_kv_heads && key_cache.shape(3) == p.head_size,
            where(op, "cache head shape differs from key"));
  check_arg(slot_mapping.ndim() == 1 && static_cast<int64_t>(slot_mapping.shape(0)) == p.num_tokens,
            where(op, "slot_mapping must be [num_tokens]"));
  p.slot_mapping = typed<int64_t>(slot_mapping, cuda, op, "slot_mapping");
  p.key = key.data();
  p.value = value.data();
  p.key_cache = key_cache.data();
  p.value_cache = value_cache.data();
  p.key_token_stride = p.num_tokens > 1 ? key.stride(0) : p.num_kv_heads * p.head_size;
  p.value_token_stride = p.num_tokens > 1 ? value.stride(0) : p.num_kv_heads * p.head_size;
  p.k_scale = k_scale;
  p.v_scale = v_scale;
  FASTLLM_RUN_OP(reshape_and_cache, cuda, p, stream);
}

void copy_blocks(const Array& cache, const Array& block_mapping, uintptr_t stream) {
  const char* op = "copy_blocks";
  const bool cuda = cuda_device(cache, op);
  check_arg(cache.ndim() >= 1 && cache.shape(0) > 0, where(op, "cache must be [num_blocks, ...]"));
  check_contiguous(cache, op, "cache");
  check_arg(block_mapping.ndim() == 2 && block_mapping.shape(1) == 2,
            where(op, "block_mapping must be [num_pairs, 2]"));
  const int32_t* pairs = typed<int32_t>(block_mapping, cuda, op, "block_mapping");
  const int64_t num_blocks = cache.shape(0);
  const int64_t block_bytes = static_cast<int64_t>(cache.nbytes()) / num_blocks;
  const int64_t num_pairs = block_mapping.shape(0);
  nb::gil_scoped_release release;
  if (cuda) {
#ifdef FASTLLM_WITH_CUDA
    k::copy_blocks_cuda(cache.data(), num_blocks, block_bytes, pairs, num_pairs,
                        stream_ptr(stream));
#endif
  } else {
    k::copy_blocks_cpu(cache.data(), num_blocks, block_bytes, pairs, num_pairs);
  }
}

void swap_blocks(const Array& src, const Array& dst, const Array& block_mapping, uintptr_t stream) {
  const char* op = "swap_blocks";
  check_arg(src.ndim() >= 1 && dst.ndim() >= 1 && src.shape(0) > 0 && dst.shape(0) > 0,
            where(op, "caches must be [num_blocks, ...]"));
  check_contiguous(src, op, "src");
  check_contiguous(dst, op, "dst");
  check_arg(src.dtype() == dst.dtype(), where(op, "src and dst dtypes differ"));
  const int64_t block_bytes = static_cast<int64_t>(src.nbytes()) / src.shape(0);
  check_arg(block_bytes == static_cast<int64_t>(dst.nbytes()) / static_cast<int64_t>(dst.shape(0)),
            where(op, "src and dst block sizes differ"));
  check_arg(block_mapping.ndim() == 2 && block_mapping.shape(1) == 2,
            where(op, "block_mapping must be [num_pairs, 2]"));
  const int64_t* pairs = typed<int64_t>(block_mapping, false, op, "block_mapping (a CPU tensor)");
  const bool any_cuda = cuda_device(src, op) || cuda_device(dst, op);
  nb::gil_scoped_release release;
  if (any_cuda) {
#ifdef FASTLLM_WITH_CUDA
    k::swap_blocks_cuda(src.data(), src.shape(0), dst.data(), dst.shape(0), block_bytes, pairs,
                        block_mapping.shape(0), stream_ptr(stream));
#endif
  } else {
    k::swap_blocks_cpu(src.data(), src.shape(0), dst.data(), dst.shape(0), block_bytes, pairs,
                       block_mapping.shape(0));
  }
}

// ---- attention --------------------------------------------------------------------------------

void paged_attention(const Array& out, const Array& query, const Array& key_cache,
                     const Array& value_cache, const Array& query_start_loc,
                     const Array& context_lens, const Array& block_tables, float scale,
                     int32_t sliding_window, float softcap, float k_scale, float v_scale,
                     int64_t max_context_len, const Array& workspace, uintptr_t stream,
                     const std::string& fp8) {
  const char* op = "paged_attention";
  const bool cuda = cuda_device(query, op);
  check_arg(query.ndim() == 3 && out.ndim() == 3,
            where(op, "query and out must be [num_tokens, num_heads, head_size]"));
  check_arg(key_cache.ndim() == 4 && value_cache.ndim() == 4,
            where(op, "caches must be [num_blocks, block_size, kv_heads, head_size]"));
  for (const Array* a : {&out, &key_cache, &value_cache}) check_device(*a, cuda, op, "tensor");
  k::PagedAttentionParams p;
  p.dtype = float_dtype(query, op, "query");
  check_arg(float_dtype(out, op, "out") == p.dtype, where(op, "out dtype differs from query"));
  const k::DType fp8_type = fp8_format(fp8, op);
  p.cache_dtype = float_dtype(key_cache, op, "key_cache", fp8_type);
  check_arg(float_dtype(value_cache, op, "value_cache", fp8_type) == p.cache_dtype,
            where(op, "key_cache and value_cache dtypes differ"));
  check_dense_from(query, 1, op, "query");
  check_dense_from(out, 1, op, "out");
  check_contiguous(key_cache, op, "key_cache");
  check_contiguous(value_cache, op, "value_cache");
  p.num_tokens = query.shape(0);
  p.num_heads = query.shape(1);
  p.head_size = query.shape(2);
  check_arg(out.shape(0) == query.shape(0) && out.shape(1) == query.shape(1) &&
                out.shape(2) == query.shape(2),
            where(op, "out shape differs from query"));
  p.num_blocks = key_cache.shape(0);
  p.block_size = key_cache.shape(1);
  p.num_kv_heads = key_cache.shape(2);
  for (size_t d = 0; d < 4; ++d)
    check_arg(key_cache.shape(d) == value_cache.shape(d), where(op, "cache shapes differ"));
  check_arg(static_cast<int64_t>(key_cache.shape(3)) == p.head_size,
            where(op, "cache head_size differs from query"));
  check_arg(query_start_loc.ndim() == 1 && query_start_loc.shape(0) >= 1,
            where(op, "query_start_loc must be [num_seqs + 1]"));
  p.num_seqs = static_cast<int64_t>(query_start_loc.shape(0)) - 1;
  check_arg(context_lens.ndim() == 1 && static_cast<int64_t>(context_lens.shape(0)) == p.num_seqs,
            where(op, "context_lens must be [num_seqs]"));
  check_arg(block_tables.ndim() == 2 && static_cast<int64_t>(block_tables.shape(0)) == p.num_seqs,
            where(op, "block_tables must be [num_seqs, max_blocks_per_seq]"));
  p.query_start_loc = typed<int32_t>(query_start_loc, cuda, op, "query_start_loc");
  p.context_lens = typed<int32_t>(context_lens, cuda, op, "context_lens");
  p.block_tables = typed<int32_t>(block_tables, cuda, op, "block_tables");
  p.max_blocks_per_seq = block_tables.shape(1);
  p.out = out.data();
  p.query = query.data();
  p.key_cache = key_cache.data();
  p.value_cache = value_cache.data();
  p.query_token_stride = p.num_tokens > 1 ? query.stride(0) : p.num_heads * p.head_size;
  p.out_token_stride = p.num_tokens > 1 ? out.stride(0) : p.num_heads * p.head_size;
  p.scale = scale;
  p.sliding_window = sliding_window;
  p.softcap = softcap;
  p.k_scale = k_scale;
  p.v_scale = v_scale;
  p.max_context_len = max_context_len;
  if (workspace.is_valid()) {
    check_device(workspace, cuda, op, "workspace");
    check_contiguous(workspace, op, "workspace");
    p.workspace = workspace.data();
    p.workspace_bytes = workspace.nbytes();
  }
  FASTLLM_RUN_OP(paged_attention, cuda, p, stream);
}

// ---- norms, rotary, activations -----------------------------------------------------------------

// Rows of a 2-D (or N-D, flattened) tensor whose last dimension is dense: (rows, row stride).
std::pair<int64_t, int64_t> rows_of(const Array& a, const char* op, const char* name) {
  check_arg(a.ndim() >= 1, where(op, name) + " must have at least one dimension");
  check_dense_from(a, a.ndim() == 1 ? 0 : a.ndim() - 1, op, name);
  int64_t rows = 1;
  for (size_t d = 0; d + 1 < a.ndim(); ++d) rows *= static_cast<int64_t>(a.shape(d));
  const int64_t last = a.shape(a.ndim() - 1);
  if (a.ndim() <= 1 || rows <= 1) return {rows, last};
  // Leading dimensions must flatten to one stride.
  int64_t stride = a.stride(a.ndim() - 2);
  int64_t expected = stride;
  for (size_t d = a.ndim() - 1; d-- > 0;) {
    check_arg(a.shape(d) == 1 || a.stride(d) == expected,
              where(op, name) + " leading dimensions must flatten to one row stride");
    expected *= static_cast<int64_t>(a.shape(d));
  }
  return {rows, stride};
}

// The operands every norm op shares, checked once: input and a second [rows, hidden] operand
// (out, or fused_add_rms_norm's residual) on one device and of one dtype with the [hidden] weight.
struct NormOperands {
  bool cuda;
  k::DType dtype;
  int64_t rows, hidden, input_stride, other_stride;
};

NormOperands norm_operands(const char* op, const Array& input, const Array& other,
                           const char* other_name, const Array& weight) {
  NormOperands n;
  n.cuda = cuda_device(input, op);
  check_device(other, n.cuda, op, other_name);
  check_device(weight, n.cuda, op, "weight");
  n.dtype = float_dtype(input, op, "input");
  check_arg(
      float_dtype(other, op, other_name) == n.dtype && float_dtype(weight, op, "weight") == n.dtype,
      where(op, (std::string("input, ") + other_name + " and weight must share a dtype").c_str()));
  auto [rows, in_stride] = rows_of(input, op, "input");
  auto [other_rows, other_stride] = rows_of(other, op, other_name);
  n.hidden = input.shape(input.ndim() - 1);
  check_arg(other_rows == rows && static_cast<int64_t>(other.shape(other.ndim() - 1)) == n.hidden,
            where(op, (std::string(other_name) + " shape differs from input").c_str()));
  check_arg(weight.ndim() == 1 && static_cast<int64_t>(weight.shape(0)) == n.hidden,
            where(op, "weight must be [hidden]"));
  check_contiguous(weight, op, "weight");
  n.rows = rows;
  n.input_stride = in_stride;
  n.other_stride = other_stride;
  return n;
}

void rms_norm(const Array& out, const Array& input, const Array& weight, float eps,
              uintptr_t stream) {
  const NormOperands n = norm_operands("rms_norm", input, out, "out", weight);
  k::RmsNormParams p;
  p.dtype = n.dtype;
  p.hidden = n.hidden;
  p.num_tokens = n.rows;
  p.input_stride = n.input_stride;
  p.out_stride = n.other_stride;
  p.input = input.data();
  p.out = out.data();
  p.weight = weight.data();
  p.eps = eps;
  FASTLLM_RUN_OP(rms_norm, n.cuda, p, stream);
}

void fused_add_rms_norm(const Array& input, const Array& residual, const Array& weight, float eps,
                        uintptr_t stream) {
  const NormOperands n = norm_operands("fused_add_rms_norm", input, residual, "residual", weight);
  k::FusedAddRmsNormParams p;
  p.dtype = n.dtype;
  p.hidden = n.hidden;
  p.num_tokens = n.rows;
  p.input_stride = n.input_stride;
  p.residual_stride = n.other_stride;
  p.input = input.data();
  p.residual = residual.data();
  p.weight = weight.data();
  p.eps = eps;
  FASTLLM_RUN_OP(fused_add_rms_norm, n.cuda, p, stream);
}

void layer_norm(const Array& out, const Array& input, const Array& weight, const Array& bias,
                float eps, uintptr_t stream) {
  const char* op = "layer_norm";
  const NormOperands n = norm_operands(op, input, out, "out", weight);
  k::LayerNormParams p;
  p.dtype = n.dtype;
  p.hidden = n.hidden;
  if (bias.is_valid()) {
    check_device(bias, n.cuda, op, "bias");
    check_arg(float_dtype(bias, op, "bias") == p.dtype, where(op, "bias dtype differs from input"));
    check_arg(bias.ndim() == 1 && static_cast<int64_t>(bias.shape(0)) == p.hidden,
              where(op, "bias must be [hidden]"));
    check_contiguous(bias, op, "bias");
    p.bias = bias.data();
  }
  p.num_tokens = n.rows;
  p.input_stride = n.input_stride;
  p.out_stride = n.other_stride;
  p.input = input.data();
  p.out = out.data();
  p.weight = weight.data();
  p.eps = eps;
  FASTLLM_RUN_OP(layer_norm, n.cuda, p, stream);
}

void rotary_embedding(const Array& positions, const Array& query, const Array& key,
                      const Array& cos_sin_cache, int64_t head_size, bool is_neox,
                      uintptr_t stream) {
  const char* op = "rotary_embedding";
  const bool cuda = cuda_device(query, op);
  k::RotaryParams p;
  p.dtype = float_dtype(query, op, "query");
  check_arg(positions.ndim() == 1, where(op, "positions must be [num_tokens]"));
  p.positions = typed<int64_t>(positions, cuda, op, "positions");
  p.num_tokens = positions.shape(0);
  check_arg(head_size > 0, where(op, "head_size must be positive"));
  auto [q_rows, q_stride] = rows_of(query, op, "query");
  (void)q_rows;
  check_arg(query.ndim() >= 2 && static_cast<int64_t>(query.shape(0)) == p.num_tokens,
            where(op, "query must be [num_tokens, ...]"));
  // [tokens, heads * head_size] or [tokens, heads, head_size]: heads dense inside a token.
  check_dense_from(query, 1, op, "query");
  const int64_t q_row = numel(query) / std::max<int64_t>(p.num_tokens, 1);
  check_arg(q_row % head_size == 0, where(op, "query row not a multiple of head_size"));
  p.num_heads = q_row / head_size;
  p.query = query.data();
  p.query_token_stride = p.num_tokens > 1 ? query.stride(0) : q_row;
  (void)q_stride;
  if (key.is_valid()) {
    check_device(key, cuda, op, "key");
    check_arg(float_dtype(key, op, "key") == p.dtype, where(op, "key dtype differs from query"));
    check_arg(key.ndim() >= 2 && static_cast<int64_t>(key.shape(0)) == p.num_tokens,
              where(op, "key must be [num_tokens, ...]"));
    check_dense_from(key, 1, op, "key");
    const int64_t k_row = numel(key) / std::max<int64_t>(p.num_tokens, 1);
    check_arg(k_row % head_size == 0, where(op, "key row not a multiple of head_size"));
    p.num_kv_heads = k_row / head_size;
    p.key = key.data();
    p.key_token_stride = p.num_tokens > 1 ? key.stride(0) : k_row;
  }
  check_arg(cos_sin_cache.ndim() == 2,
            where(op, "cos_sin_cache must be [max_position, rotary_dim]"));
  p.cos_sin_cache = typed<float>(cos_sin_cache, cuda, op, "cos_sin_cache (float32)");
  p.max_position = cos_sin_cache.shape(0);
  p.rotary_dim = cos_sin_cache.shape(1);
  p.head_size = head_size;
  p.is_neox = is_neox;
  FASTLLM_RUN_OP(rotary_embedding, cuda, p, stream);
}

// An elementwise op's input and out, checked once: one device, one dtype, rows of equal count
// (each with its own stride); the ops check the widths.
struct RowPair {
  bool cuda;
  k::DType dtype;
  int64_t rows, input_stride, out_stride, input_width, out_width;
};

RowPair row_pair(const char* op, const Array& out, const Array& input) {
  RowPair r;
  r.cuda = cuda_device(input, op);
  check_device(out, r.cuda, op, "out");
  r.dtype = float_dtype(input, op, "input");
  check_arg(float_dtype(out, op, "out") == r.dtype, where(op, "out dtype differs from input"));
  auto [rows, in_stride] = rows_of(input, op, "input");
  auto [out_rows, out_stride] = rows_of(out, op, "out");
  check_arg(out_rows == rows, where(op, "out must have input's rows"));
  r.rows = rows;
  r.input_stride = in_stride;
  r.out_stride = out_stride;
  r.input_width = input.shape(input.ndim() - 1);
  r.out_width = out.shape(out.ndim() - 1);
  return r;
}

// The kernel parameters of a gated (ActAndMulParams) or plain (ActivationParams) activation over a
// checked row pair: the two share their fields; d is the output width.
template <class Params>
Params activation_params(const RowPair& r, const Array& out, const Array& input, int64_t d,
                         int32_t activation) {
  Params p;
  p.dtype = r.dtype;
  p.d = d;
  p.num_tokens = r.rows;
  p.input_stride = r.input_stride;
  p.out_stride = r.out_stride;
  p.input = input.data();
  p.out = out.data();
  p.activation = static_cast<k::Activation>(activation);
  return p;
}

void act_and_mul(const Array& out, const Array& input, int32_t activation, uintptr_t stream) {
  const char* op = "act_and_mul";
  const RowPair r = row_pair(op, out, input);
  check_arg(activation >= 0 && activation <= 2, where(op, "unknown activation"));
  check_arg(r.input_width % 2 == 0, where(op, "input's last dimension must be even"));
  check_arg(r.out_width == r.input_width / 2,
            where(op, "out must be input's shape with the last dimension halved"));
  const auto p = activation_params<k::ActAndMulParams>(r, out, input, r.out_width, activation);
  FASTLLM_RUN_OP(act_and_mul, r.cuda, p, stream);
}

void activation(const Array& out, const Array& input, int32_t activation, uintptr_t stream) {
  const char* op = "activation";
  const RowPair r = row_pair(op, out, input);
  check_arg(activation >= 0 && activation <= 3, where(op, "unknown activation"));
  check_arg(r.out_width == r.input_width, where(op, "out shape differs from input"));
  const auto p = activation_params<k::ActivationParams>(r, out, input, r.input_width, activation);
  FASTLLM_RUN_OP(activation, r.cuda, p, stream);
}

void softcap(const Array& data, float cap, uintptr_t stream) {
  const char* op = "softcap";
  const bool cuda = cuda_device(data, op);
  check_arg(cap > 0.0f, where(op, "cap must be > 0"));
  k::SoftcapParams p;
  p.dtype = float_dtype(data, op, "data");
  auto [rows, stride] = rows_of(data, op, "data");
  p.d = data.shape(data.ndim() - 1);
  p.num_tokens = rows;
  p.stride = stride;
  p.data = data.data();
  p.cap = cap;
  FASTLLM_RUN_OP(softcap, cuda, p, stream);
}

// ---- sampling -----------------------------------------------------------------------------------

template <typename T>
const T* row_param(const Array& a, bool cuda, int64_t rows, const char* name) {
  if (!a.is_valid()) return nullptr;
  check_arg(a.ndim() == 1 && static_cast<int64_t>(a.shape(0)) == rows,
            where("sample", name) + " must be [num_rows]");
  return typed<T>(a, cuda, "sample", name);
}

void csr(const Array& offsets, const Array& ids, bool cuda, int64_t rows, const char* name,
         const int32_t*& offsets_out, const int32_t*& ids_out) {
  if (!offsets.is_valid() && !ids.is_valid()) return;
  check_arg(offsets.is_valid() && ids.is_valid(),
            where("sample", name) + ": offsets and ids must be given together");
  check_arg(offsets.ndim() == 1 && static_cast<int64_t>(offsets.shape(0)) == rows + 1,
            where("sample", name) + " offsets must be [num_rows + 1]");
  check_arg(ids.ndim() == 1, where("sample", name) + " ids must be 1-D");
  offsets_out = typed<int32_t>(offsets, cuda, "sample", name);
  ids_out = typed<int32_t>(ids, cuda, "sample", name);
  if (!cuda) {
    // Host offsets can be checked here; device ones are trusted (the engine builds them).
    check_arg(offsets_out[0] == 0 && offsets_out[rows] <= static_cast<int64_t>(ids.shape(0)),
              where("sample", name) + " offsets out of range");
    for (int64_t r = 0; r < rows; ++r)
      check_arg(offsets_out[r] <= offsets_out[r + 1],
                where("sample", name) + " offsets must be non-decreasing");
  }
}

// The inputs of one sample() call, by name (arrays kept alive by the struct; None = neutral).
struct SamplingInputs {
  Array temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty,
      seeds, generator_offsets;
  uint64_t global_seed = 0;
  Array prompt_offsets, prompt_ids, output_offsets, output_ids, bias_offsets, bias_ids, bias_values,
      allowed_offsets, allowed_ids;
  Array draft_ids;  // typical acceptance (speculative decoding): per row, -1 = no draft
  float typical_threshold = 0.0f, typical_alpha = 0.0f;
};

void sample(const Array& logits, const SamplingInputs& in, const Array& sampled,
            const Array& sampled_logprob, const Array& sampled_rank, const Array& top_logprobs,
            const Array& top_ids, const Array& workspace, uintptr_t stream) {
  const char* op = "sample";
  const bool cuda = cuda_device(logits, op);
  check_arg(logits.ndim() == 2, where(op, "logits must be [num_rows, vocab]"));
  check_arg(logits.dtype() == nb::dtype<float>(), where(op, "logits must be float32"));
  check_dense_from(logits, 1, op, "logits");
  k::SamplingParamsBatch p;
  p.num_rows = logits.shape(0);
  p.vocab = logits.shape(1);
  p.logits = static_cast<const float*>(logits.data());
  p.logits_row_stride = p.num_rows > 1 ? logits.stride(0) : p.vocab;
  const int64_t rows = p.num_rows;
  p.temperature = row_param<float>(in.temperature, cuda, rows, "temperature");
  p.top_k = row_param<int32_t>(in.top_k, cuda, rows, "top_k");
  p.top_p = row_param<float>(in.top_p, cuda, rows, "top_p");
  p.min_p = row_param<float>(in.min_p, cuda, rows, "min_p");
  p.repetition_penalty = row_param<float>(in.repetition_penalty, cuda, rows, "repetition_penalty");
  p.presence_penalty = row_param<float>(in.presence_penalty, cuda, rows, "presence_penalty");
  p.frequency_penalty = row_param<float>(in.frequency_penalty, cuda, rows, "frequency_penalty");
  p.seeds = row_param<int64_t>(in.seeds, cuda, rows, "seeds");
  p.generator_offsets = row_param<int64_t>(in.generator_offsets, cuda, rows, "generator_offsets");
  p.global_seed = in.global_seed;
  csr(in.prompt_offsets, in.prompt_ids, cuda, rows, "prompt", p.prompt_offsets, p.prompt_ids);
  csr(in.output_offsets, in.output_ids, cuda, rows, "output", p.output_offsets, p.output_ids);
  csr(in.bias_offsets, in.bias_ids, cuda, rows, "logit_bias", p.bias_offsets, p.bias_ids);
  csr(in.allowed_offsets, in.allowed_ids, cuda, rows, "allowed", p.allowed_offsets, p.allowed_ids);
  p.draft_ids = row_param<int32_t>(in.draft_ids, cuda, rows, "draft_ids");
  p.typical_threshold = in.typical_threshold;
  p.typical_alpha = in.typical_alpha;
  if (p.bias_ids != nullptr) {
    check_arg(in.bias_values.is_valid() && in.bias_values.ndim() == 1 &&
                  in.bias_values.shape(0) == in.bias_ids.shape(0),
              where(op, "bias_values must match bias_ids"));
    p.bias_values = typed<float>(in.bias_values, cuda, op, "bias_values");
  }
  p.sampled = const_cast<int32_t*>(row_param<int32_t>(sampled, cuda, rows, "sampled"));
  check_arg(p.sampled != nullptr || rows == 0, where(op, "sampled output is required"));
  p.sampled_logprob =
      const_cast<float*>(row_param<float>(sampled_logprob, cuda, rows, "sampled_logprob"));
  p.sampled_rank =
      const_cast<int32_t*>(row_param<int32_t>(sampled_rank, cuda, rows, "sampled_rank"));
  if (top_logprobs.is_valid()) {
    check_arg(top_logprobs.ndim() == 2 && static_cast<int64_t>(top_logprobs.shape(0)) == rows &&
                  top_ids.is_valid() && top_ids.ndim() == 2 &&
                  top_ids.shape(0) == top_logprobs.shape(0) &&
                  top_ids.shape(1) == top_logprobs.shape(1),
              where(op, "top_logprobs and top_ids must be [num_rows, N]"));
    p.num_top_logprobs = top_logprobs.shape(1);
    p.top_logprobs = typed<float>(top_logprobs, cuda, op, "top_logprobs");
    p.top_ids = typed<int32_t>(top_ids, cuda, op, "top_ids");
  }
  if (workspace.is_valid()) {
    check_device(workspace, cuda, op, "workspace");
    check_contiguous(workspace, op, "workspace");
    p.workspace = workspace.data();
    p.workspace_bytes = workspace.nbytes();
  }
  FASTLLM_RUN_OP(sample, cuda, p, stream);
}

// ---- quantized linear ---------------------------------------------------------------------------

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

// ---- mixture of experts -----------------------------------------------------------------------

void moe_route(const Array& logits, int64_t top_k, bool renormalize, const Array& topk_ids,
               const Array& topk_weights, uintptr_t stream) {
  const char* op = "moe_route";
  const bool cuda = cuda_device(logits, op);
  check_arg(logits.dtype() == nb::dtype<float>() && logits.ndim() == 2,
            where(op, "logits must be float32 [num_tokens, num_experts]"));
  check_dense_from(logits, 1, op, "logits");
  k::MoeRouteParams p;
  p.num_tokens = logits.shape(0);
  p.num_experts = logits.shape(1);
  p.logits_stride = p.num_tokens > 1 ? logits.stride(0) : p.num_experts;
  p.top_k = top_k;
  p.renormalize = renormalize;
  p.logits = static_cast<const float*>(logits.data());
  p.topk_ids = typed<int32_t>(topk_ids, cuda, op, "topk_ids (int32)");
  p.topk_weights = typed<float>(topk_weights, cuda, op, "topk_weights (float32)");
  check_arg(numel(topk_ids) == p.num_tokens * top_k && numel(topk_weights) == p.num_tokens * top_k,
            where(op, "topk_ids and topk_weights must be [num_tokens, top_k]"));
  FASTLLM_RUN_OP(moe_route, cuda, p, stream);
}

// The routing arrays both expert ops take: int32 ids and float32 weights [num_tokens, top_k].
void check_routing(const char* op, bool cuda, const Array& topk_ids, const Array& topk_weights,
                   int64_t num_tokens, int64_t* top_k, const int32_t** ids, const float** weights) {
  check_arg(topk_ids.ndim() == 2 && topk_weights.ndim() == 2 &&
                static_cast<int64_t>(topk_ids.shape(0)) == num_tokens &&
                topk_ids.shape(0) == topk_weights.shape(0) &&
                topk_ids.shape(1) == topk_weights.shape(1),
            where(op, "topk_ids and topk_weights must be [num_tokens, top_k]"));
  *top_k = topk_ids.shape(1);
  *ids = typed<int32_t>(topk_ids, cuda, op, "topk_ids (int32)");
  *weights = typed<float>(topk_weights, cuda, op, "topk_weights (float32)");
}

void moe_experts(const Array& out, const Array& input, const Array& topk_ids,
                 const Array& topk_weights, const Array& gate_up, int32_t gate_up_type,
                 const Array& down, int32_t down_type, int64_t intermediate, bool allow_simd) {
  const char* op = "moe_experts";
  check_arg(!cuda_device(input, op), where(op, "runs on the CPU (moe_experts_float on CUDA)"));
  check_arg(input.dtype() == nb::dtype<float>() && out.dtype() == nb::dtype<float>() &&
                input.ndim() == 2 && out.ndim() == 2,
            where(op, "input and out must be float32 [num_tokens, hidden]"));
  check_device(out, false, op, "out");
  k::MoeExpertsParams p;
  auto [rows, in_stride] = rows_of(input, op, "input");
  auto [out_rows, out_stride] = rows_of(out, op, "out");
  p.num_tokens = rows;
  p.hidden = input.shape(1);
  check_arg(out_rows == rows && static_cast<int64_t>(out.shape(1)) == p.hidden,
            where(op, "out must be shaped like input"));
  p.input_stride = in_stride;
  p.out_stride = out_stride;
  p.intermediate = intermediate;
  check_routing(op, false, topk_ids, topk_weights, rows, &p.top_k, &p.topk_ids, &p.topk_weights);
  p.gate_up_type = static_cast<k::QuantType>(gate_up_type);
  p.down_type = static_cast<k::QuantType>(down_type);
  const int64_t gv = k::quant_block_values(p.gate_up_type);
  const int64_t dv = k::quant_block_values(p.down_type);
  check_arg(gv > 0 && dv > 0, where(op, "unknown quantization type"));
  check_arg(intermediate > 0 && p.hidden % gv == 0 && intermediate % dv == 0,
            where(op, "rows must be whole blocks"));
  const int64_t gate_up_expert =
      2 * intermediate * (p.hidden / gv) * k::quant_block_bytes(p.gate_up_type);
  check_arg(gate_up.ndim() >= 1 && numel(gate_up) % gate_up_expert == 0,
            where(op, "gate_up must hold whole experts of 2 * intermediate rows"));
  p.num_experts = numel(gate_up) / gate_up_expert;
  check_arg(numel(down) ==
                p.num_experts * p.hidden * (intermediate / dv) * k::quant_block_bytes(p.down_type),
            where(op, "down must hold num_experts experts of hidden rows of intermediate values"));
  p.gate_up = typed<uint8_t>(gate_up, false, op, "gate_up (uint8 rows)");
  p.down = typed<uint8_t>(down, false, op, "down (uint8 rows)");
  p.input = static_cast<const float*>(input.data());
  p.out = static_cast<float*>(out.data());
  p.allow_simd = allow_simd;
  nb::gil_scoped_release release_gil;
  k::moe_experts_cpu(p);
}

void moe_experts_float(const Array& out, const Array& input, const Array& topk_ids,
                       const Array& topk_weights, const Array& gate_up, const Array& down,
                       const Array& workspace, uintptr_t stream) {
  const char* op = "moe_experts_float";
  const bool cuda = cuda_device(input, op);
  check_arg(cuda,
            where(op, "runs on CUDA (on the CPU pass float32 rows to moe_experts as type 0)"));
#ifdef FASTLLM_WITH_CUDA
  check_arg(
      input.ndim() == 2 && out.ndim() == 2 && gate_up.ndim() == 3 && down.ndim() == 3,
      where(op, "input/out [num_tokens, hidden], gate_up [E, 2I, hidden], down [E, hidden, I]"));
  k::MoeExpertsCudaParams p;
  p.dtype = float_dtype(input, op, "input");
  for (const Array* a : {&out, &gate_up, &down}) {
    check_device(*a, true, op, "tensor");
    check_contiguous(*a, op, "tensor");
    check_arg(float_dtype(*a, op, "tensor") == p.dtype, where(op, "dtypes differ"));
  }
  check_contiguous(input, op, "input");
  p.num_tokens = input.shape(0);
  p.hidden = input.shape(1);
  p.num_experts = gate_up.shape(0);
  p.intermediate = gate_up.shape(1) / 2;
  check_arg(static_cast<int64_t>(gate_up.shape(2)) == p.hidden &&
                static_cast<int64_t>(down.shape(0)) == p.num_experts &&
                static_cast<int64_t>(down.shape(1)) == p.hidden &&
                static_cast<int64_t>(down.shape(2)) == p.intermediate &&
                static_cast<int64_t>(out.shape(0)) == p.num_tokens &&
                static_cast<int64_t>(out.shape(1)) == p.hidden,
            where(op, "inconsistent shapes"));
  check_routing(op, true, topk_ids, topk_weights, p.num_tokens, &p.top_k, &p.topk_ids,
                &p.topk_weights);
  check_device(workspace, true, op, "workspace");
  check_arg(numel(workspace) * static_cast<int64_t>(workspace.itemsize()) >=
                k::moe_experts_cuda_workspace_bytes(p.num_tokens, p.hidden, p.intermediate,
                                                    p.num_experts, p.top_k),
            where(op, "workspace too small (moe_experts_cuda_workspace_bytes)"));
  p.input = input.data();
  p.out = out.data();
  p.gate_up = gate_up.data();
  p.down = down.data();
  p.workspace = workspace.data();
  nb::gil_scoped_release release_gil;
  k::moe_experts_cuda(p, stream_ptr(stream));
#else
  (void)out, (void)topk_ids, (void)topk_weights, (void)gate_up, (void)down, (void)workspace,
      (void)stream;
#endif
}

// The arguments a quantized linear's kernels share (quant_gemm, refine_top_logits): float32 input
// [..., k] and output [..., n] rows, weight rows of n * k / block_values blocks, optional bias [n].
struct QuantLinearArgs {
  k::QuantType type;
  int64_t m, n, k, input_stride, out_stride;
  const uint8_t* weight;
  const float* bias;
};

QuantLinearArgs check_quant_linear(const char* op, bool cuda, const Array& out,
                                   const char* out_name, const Array& input, const Array& weight,
                                   int32_t type, const Array& bias) {
  QuantLinearArgs a;
  a.type = static_cast<k::QuantType>(type);
  const int64_t values = k::quant_block_values(a.type);
  check_arg(values > 0, where(op, "unknown quantization type ") + std::to_string(type));
  check_arg(input.dtype() == nb::dtype<float>() && out.dtype() == nb::dtype<float>(),
            where(op, "input and ") + out_name + " must be float32");
  auto [rows, in_stride] = rows_of(input, op, "input");
  auto [out_rows, out_stride] = rows_of(out, op, out_name);
  a.k = input.shape(input.ndim() - 1);
  a.n = out.shape(out.ndim() - 1);
  check_arg(out_rows == rows, where(op, out_name) + " must have input's rows");
  check_arg(a.k % values == 0, where(op, "in_features must be a multiple of the block size"));
  a.weight = typed<uint8_t>(weight, cuda, op, "weight");
  check_arg(numel(weight) == a.n * (a.k / values) * k::quant_block_bytes(a.type),
            where(op, "weight must hold out_features rows of in_features / block_values blocks"));
  a.bias = bias.is_valid() ? typed<float>(bias, cuda, op, "bias") : nullptr;
  check_arg(a.bias == nullptr || numel(bias) == a.n, where(op, "bias must be [out_features]"));
  a.m = rows;
  a.input_stride = in_stride;
  a.out_stride = out_stride;
  return a;
}

void quant_gemm(const Array& out, const Array& input, const Array& weight, int32_t type,
                const Array& bias, bool allow_simd, uintptr_t stream) {
  const char* op = "quant_gemm";
  const bool cuda = cuda_device(input, op);
  check_device(out, cuda, op, "out");
  const QuantLinearArgs a = check_quant_linear(op, cuda, out, "out", input, weight, type, bias);
  k::QuantGemmParams p;
  p.type = a.type;
  p.k = a.k;
  p.n = a.n;
  p.bias = a.bias;
  p.m = a.m;
  p.input_stride = a.input_stride;
  p.out_stride = a.out_stride;
  p.input = static_cast<const float*>(input.data());
  p.out = static_cast<float*>(out.data());
  p.weight = a.weight;
  p.allow_simd = allow_simd;
  FASTLLM_RUN_OP(quant_gemm, cuda, p, stream);
}

void fp8_gemm(const Array& out, const Array& input, const Array& weight, const Array& scale,
              const Array& bias, uintptr_t stream) {
  const char* op = "fp8_gemm";
  const bool cuda = cuda_device(input, op);
  check_device(out, cuda, op, "out");
  check_arg(input.dtype() == nb::dtype<float>() && out.dtype() == nb::dtype<float>(),
            where(op, "input and out must be float32"));
  auto [rows, in_stride] = rows_of(input, op, "input");
  auto [out_rows, out_stride] = rows_of(out, op, "out");
  check_arg(out_rows == rows, where(op, "out must have input's rows"));
  k::Fp8GemmParams p;
  p.k = input.shape(input.ndim() - 1);
  p.n = out.shape(out.ndim() - 1);
  p.m = rows;
  p.input_stride = in_stride;
  p.out_stride = out_stride;
  p.weight = typed<uint8_t>(weight, cuda, op, "weight");
  check_arg(numel(weight) == p.n * p.k, where(op, "weight must be [out_features, in_features]"));
  p.scale = typed<float>(scale, cuda, op, "scale");
  check_arg(numel(scale) == p.n, where(op, "scale must be [out_features]"));
  p.bias = bias.is_valid() ? typed<float>(bias, cuda, op, "bias") : nullptr;
  check_arg(p.bias == nullptr || numel(bias) == p.n, where(op, "bias must be [out_features]"));
  p.input = static_cast<const float*>(input.data());
  p.out = static_cast<float*>(out.data());
  FASTLLM_RUN_OP(fp8_gemm, cuda, p, stream);
}

int32_t quant_repack(const Array& weight, int32_t type, int64_t in_features) {
  const char* op = "quant_repack";
  const auto qtype = static_cast<k::QuantType>(type);
  const int64_t values = k::quant_block_values(qtype);
  check_arg(values > 0, where(op, "unknown quantization type ") + std::to_string(type));
  check_arg(weight.ndim() == 2, where(op, "weight must be 2-D [out_features, row_bytes]"));
  check_arg(in_features > 0 && in_features % values == 0 &&
                static_cast<int64_t>(weight.shape(1)) ==
                    in_features / values * k::quant_block_bytes(qtype),
            where(op, "weight rows must hold in_features values"));
  check_contiguous(weight, op, "weight");
  auto* data = typed<uint8_t>(weight, false, op, "weight");
  nb::gil_scoped_release release_gil;
  return static_cast<int32_t>(
      k::quant_repack_rows8(qtype, data, static_cast<int64_t>(weight.shape(0)), in_features));
}

// Source weight rows that may be read-only (a GGUF file's mapped pages): uint8 [n, row_bytes],
// contiguous, on the CPU.
using SourceRows = nb::ndarray<nb::ro, nb::device::cpu>;

const uint8_t* source_rows(const SourceRows& w, const char* op) {
  check_arg(w.dtype() == nb::dtype<uint8_t>() && w.ndim() == 2,
            where(op, "weight must be uint8 [out_features, row_bytes]"));
  check_arg((w.shape(1) <= 1 || w.stride(1) == 1) &&
                (w.shape(0) <= 1 || w.stride(0) == static_cast<int64_t>(w.shape(1))),
            where(op, "weight must be contiguous"));
  return static_cast<const uint8_t*>(w.data());
}

// Q8_0 rows into an 8-row layout of 38-byte blocks (Q7_0x8 or Q8_0x8).
void quant_pack_q8_rows8(const char* op, const Array& out, const SourceRows& weight,
                         int64_t in_features, bool seven_bit) {
  check_arg(weight.ndim() == 2 && in_features > 0 && in_features % 32 == 0 &&
                static_cast<int64_t>(weight.shape(1)) == in_features / 32 * 34,
            where(op, "weight must be Q8_0 rows [out_features, in_features / 32 * 34]"));
  const int64_t n = weight.shape(0);
  check_arg(n % 8 == 0, where(op, "out_features must be a multiple of 8"));
  check_arg(out.ndim() == 2 && static_cast<int64_t>(out.shape(0)) == n &&
                static_cast<int64_t>(out.shape(1)) == in_features / 32 * 38,
            where(op, "out must be uint8 [out_features, in_features / 32 * 38]"));
  const uint8_t* src = source_rows(weight, op);
  auto* dst = typed<uint8_t>(out, false, op, "out");
  nb::gil_scoped_release release_gil;
  if (seven_bit)
    k::quant_pack_q7_0x8(src, n, in_features, dst);
  else
    k::quant_pack_q8_0x8(src, n, in_features, dst);
}

void quant_dequantize_rows(const Array& out, const SourceRows& weight, int32_t type) {
  const char* op = "quant_dequantize_rows";
  const auto qtype = static_cast<k::QuantType>(type);
  const int64_t values = k::quant_block_values(qtype);
  check_arg(values > 0, where(op, "unknown quantization type ") + std::to_string(type));
  check_arg(out.ndim() == 2 && out.dtype() == nb::dtype<float>(),
            where(op, "out must be float32 [out_features, in_features]"));
  check_contiguous(out, op, "out");
  const int64_t n = out.shape(0), in_features = out.shape(1);
  check_arg(in_features % values == 0 && static_cast<int64_t>(weight.shape(0)) == n &&
                static_cast<int64_t>(weight.shape(1)) ==
                    in_features / values * k::quant_block_bytes(qtype),
            where(op, "weight must hold out's rows in type"));
  check_arg(n % k::quant_row_group(qtype) == 0,
            where(op, "a repacked layout needs whole groups of 8 rows"));
  const uint8_t* src = source_rows(weight, op);
  auto* dst = typed<float>(out, false, op, "out");
  nb::gil_scoped_release release_gil;
  k::quant_dequantize_rows(qtype, src, n, in_features, dst);
}

void refine_top_logits(const Array& logits, const Array& input, const Array& weight, int32_t type,
                       const Array& bias, int64_t count) {
  const char* op = "refine_top_logits";
  const QuantLinearArgs a =
      check_quant_linear(op, false, logits, "logits", input, weight, type, bias);
  k::RefineLogitsParams p;
  p.type = a.type;
  p.k = a.k;
  p.n = a.n;
  p.bias = a.bias;
  check_arg(count >= 0, where(op, "count must be >= 0"));
  p.m = a.m;
  p.input_stride = a.input_stride;
  p.logits_stride = a.out_stride;
  p.input = typed<float>(input, false, op, "input");
  p.logits = typed<float>(logits, false, op, "logits");
  p.weight = a.weight;
  p.count = count;
  nb::gil_scoped_release release_gil;
  k::refine_top_logits_cpu(p);
}

void quant_convert(const Array& out, const SourceRows& weight, int32_t type, int64_t in_features,
                   int32_t target) {
  const char* op = "quant_convert";
  const auto from = static_cast<k::QuantType>(type), to = static_cast<k::QuantType>(target);
  const int64_t values = k::quant_block_values(from);
  check_arg(values > 0 && k::quant_row_group(from) == 1,
            where(op, "unknown or repacked quantization type ") + std::to_string(type));
  check_arg(to == k::QuantType::kQ4_1 || to == k::QuantType::kQ8_0,
            where(op, "target must be Q4_1 (3) or Q8_0 (8)"));
  check_arg(weight.ndim() == 2 && in_features > 0 && in_features % values == 0 &&
                static_cast<int64_t>(weight.shape(1)) ==
                    in_features / values * k::quant_block_bytes(from),
            where(op, "weight rows must hold in_features values"));
  const int64_t n = weight.shape(0);
  check_arg(out.ndim() == 2 && static_cast<int64_t>(out.shape(0)) == n &&
                static_cast<int64_t>(out.shape(1)) == in_features / 32 * k::quant_block_bytes(to),
            where(op, "out must be uint8 [out_features, in_features / 32 * target block bytes]"));
  const uint8_t* src = source_rows(weight, op);
  auto* dst = typed<uint8_t>(out, false, op, "out");
  nb::gil_scoped_release release_gil;
  k::quant_convert_rows(from, src, n, in_features, to, dst);
}

// ---- LoRA ------------------------------------------------------------------------------------

// A 1-D array of raw addresses (uint64 or int64: torch has no uint64 tensors), one per slot.
const void* const* pointer_array(const Array& a, bool cuda, int64_t num_slots, const char* name) {
  const char* op = "lora_apply";
  static_assert(sizeof(const void*) == sizeof(uint64_t), "pointer arrays hold 64-bit addresses");
  check_arg(a.ndim() == 1 && static_cast<int64_t>(a.shape(0)) == num_slots,
            where(op, name) + " must be 1-D [num_slots] like ranks and scales");
  check_arg(
      a.dtype() == nb::dtype<uint64_t>() || a.dtype() == nb::dtype<int64_t>(),
      where(op, name) + " must be uint64 or int64 (data_ptr() of each slot's matrix, 0 = none)");
  check_device(a, cuda, op, name);
  check_contiguous(a, op, name);
  return static_cast<const void* const*>(a.data());
}

void lora_apply(const Array& out, const Array& input, const Array& token_slots,
                const Array& lora_a_ptrs, const Array& lora_b_ptrs, const Array& ranks,
                const Array& scales, uintptr_t stream, int64_t max_rank, const Array& workspace,
                bool b_transposed, const std::string& weight_dtype) {
  const char* op = "lora_apply";
  const bool cuda = cuda_device(input, op);
  check_device(out, cuda, op, "out");
  check_arg(out.ndim() == 2 && input.ndim() == 2,
            where(op, "out and input must be 2-D [num_tokens, features]"));
  check_arg(out.dtype() == nb::dtype<float>() && input.dtype() == nb::dtype<float>(),
            where(op, "out and input must be float32"));
  // Rows may be strided (out can be a column slice of a fused qkv output), columns dense.
  check_dense_from(out, 1, op, "out");
  check_dense_from(input, 1, op, "input");
  k::LoraParams p;
  p.num_tokens = input.shape(0);
  p.in_features = input.shape(1);
  p.out_features = out.shape(1);
  check_arg(static_cast<int64_t>(out.shape(0)) == p.num_tokens,
            where(op, "out and input must have the same number of rows"));
  p.input_stride = p.num_tokens > 1 ? input.stride(0) : p.in_features;
  p.out_stride = p.num_tokens > 1 ? out.stride(0) : p.out_features;
  check_arg(token_slots.ndim() == 1 && static_cast<int64_t>(token_slots.shape(0)) == p.num_tokens,
            where(op, "token_slots must be 1-D [num_tokens]"));
  p.token_slots = typed<int32_t>(token_slots, cuda, op, "token_slots (int32)");
  check_arg(ranks.ndim() == 1 && scales.ndim() == 1 && ranks.shape(0) == scales.shape(0),
            where(op, "ranks and scales must be 1-D [num_slots]"));
  p.num_slots = ranks.shape(0);
  p.ranks = typed<int32_t>(ranks, cuda, op, "ranks (int32)");
  p.scales = typed<float>(scales, cuda, op, "scales (float32)");
  p.lora_a = pointer_array(lora_a_ptrs, cuda, p.num_slots, "lora_a_ptrs");
  p.lora_b = pointer_array(lora_b_ptrs, cuda, p.num_slots, "lora_b_ptrs");
  p.out = static_cast<float*>(out.data());
  p.input = static_cast<const float*>(input.data());
  p.max_rank = max_rank;
  p.b_transposed = b_transposed;
  check_arg(weight_dtype == "float32" || weight_dtype == "float16",
            where(op, "weight_dtype must be 'float32' or 'float16'"));
  p.weight_dtype = weight_dtype == "float16" ? k::DType::kFloat16 : k::DType::kFloat32;
  if (workspace.is_valid()) {
    check_device(workspace, cuda, op, "workspace");
    check_contiguous(workspace, op, "workspace");
    p.workspace = workspace.data();
    p.workspace_bytes = workspace.nbytes();
  }
  FASTLLM_RUN_OP(lora, cuda, p, stream);
}

}  // namespace

void bind_kernels(nb::module_& m) {
  using nb::arg;
  m.def("built_with_cuda", &k::built_with_cuda, "True when the CUDA kernels were compiled in.");
  m.def(
      "cpu_isa", [] { return std::string(k::cpu_isa()); },
      "The CPU code path of the float kernels: 'avx2' or 'scalar' (env FASTLLM_CPU_ISA caps it).");
  m.def(
      "attention_cpu_isa", [] { return std::string(k::attention_cpu_isa()); },
      "The CPU code path of paged_attention's score and value kernels: 'avx512', 'avx2' or "
      "'scalar' (env FASTLLM_CPU_ISA caps it; cpu_isa() names the other float kernels).");
  m.def("cpu_num_threads", &k::cpu_num_threads,
        "Threads of the CPU kernels (env FASTLLM_CPU_THREADS, default all cores).");

  m.def("reshape_and_cache", &reshape_and_cache, arg("key"), arg("value"), arg("key_cache"),
        arg("value_cache"), arg("slot_mapping"), arg("k_scale") = 1.0f, arg("v_scale") = 1.0f,
        arg("stream") = 0, arg("fp8_format") = "e4m3",
        "Write key/value [tokens, kv_heads, head_size] into the paged caches "
        "[num_blocks, block_size, kv_heads, head_size] at slot_mapping (int64; < 0 skips). "
        "A uint8 cache is float8 (fp8_format 'e4m3' or 'e5m2') storing x / scale.");
  m.def("copy_blocks", &copy_blocks, arg("cache"), arg("block_mapping"), arg("stream") = 0,
        "Copy block pairs (src, dst) of an int32 [n, 2] mapping inside one cache.");
  m.def(
      "swap_blocks", &swap_blocks, arg("src"), arg("dst"), arg("block_mapping"), arg("stream") = 0,
      "Copy block src_dst[i][0] of src to block src_dst[i][1] of dst (int64 [n, 2] CPU mapping).");
  m.def("paged_attention", &paged_attention, arg("out"), arg("query"), arg("key_cache"),
        arg("value_cache"), arg("query_start_loc"), arg("context_lens"), arg("block_tables"),
        arg("scale"), arg("sliding_window") = -1, arg("softcap") = 0.0f, arg("k_scale") = 1.0f,
        arg("v_scale") = 1.0f, arg("max_context_len") = 0, arg("workspace").none() = nb::none(),
        arg("stream") = 0, arg("fp8_format") = "e4m3",
        "Varlen causal paged attention (prefill, chunked prefill and decode) into out. "
        "A uint8 cache is float8 (fp8_format 'e4m3' or 'e5m2') storing x / scale.");
  m.def("paged_attention_workspace_bytes", &k::paged_attention_workspace_bytes, arg("num_tokens"),
        arg("num_heads"), arg("head_size"), arg("max_context_len"),
        "Bytes of CUDA workspace that let paged_attention split long contexts.");
  m.def("rms_norm", &rms_norm, arg("out"), arg("input"), arg("weight"), arg("eps"),
        arg("stream") = 0, "out = input / rms(input) * weight over the last dimension.");
  m.def("fused_add_rms_norm", &fused_add_rms_norm, arg("input"), arg("residual"), arg("weight"),
        arg("eps"), arg("stream") = 0,
        "In place: residual += input; input = rms_norm(residual) * weight.");
  m.def("layer_norm", &layer_norm, arg("out"), arg("input"), arg("weight"), arg("bias").none(),
        arg("eps"), arg("stream") = 0,
        "out = (input - mean) / sqrt(var + eps) * weight + bias over the last dimension.");
  m.def("rotary_embedding", &rotary_embedding, arg("positions"), arg("query"), arg("key").none(),
        arg("cos_sin_cache"), arg("head_size"), arg("is_neox"), arg("stream") = 0,
        "Rotate query (and key) in place by position (int64).");
  m.def("act_and_mul", &act_and_mul, arg("out"), arg("input"), arg("activation"), arg("stream") = 0,
        "out = act(input[..., :d]) * input[..., d:]; activation 0 = SiLU, 1 = GeLU tanh, "
        "2 = GeLU erf.");
  m.def("activation", &activation, arg("out"), arg("input"), arg("activation"), arg("stream") = 0,
        "out = act(input); activation 0 = SiLU, 1 = GeLU tanh, 2 = GeLU erf, 3 = ReLU.");
  m.def("softcap", &softcap, arg("data"), arg("cap"), arg("stream") = 0,
        "In place: data = cap * tanh(data / cap) (cap > 0).");
  nb::class_<SamplingInputs>(m, "SamplingInputs",
                             "The per-row inputs of sample() by name (see "
                             "fastllm/kernels/sampling.h); None = the neutral value for every row")
      .def(
          "__init__",
          [](SamplingInputs* self, const Array& temperature, const Array& top_k, const Array& top_p,
             const Array& min_p, const Array& repetition_penalty, const Array& presence_penalty,
             const Array& frequency_penalty, const Array& seeds, const Array& generator_offsets,
             uint64_t global_seed, const Array& prompt_offsets, const Array& prompt_ids,
             const Array& output_offsets, const Array& output_ids, const Array& bias_offsets,
             const Array& bias_ids, const Array& bias_values, const Array& allowed_offsets,
             const Array& allowed_ids, const Array& draft_ids, float typical_threshold,
             float typical_alpha) {
            new (self) SamplingInputs{temperature,
                                      top_k,
                                      top_p,
                                      min_p,
                                      repetition_penalty,
                                      presence_penalty,
                                      frequency_penalty,
                                      seeds,
                                      generator_offsets,
                                      global_seed,
                                      prompt_offsets,
                                      prompt_ids,
                                      output_offsets,
                                      output_ids,
                                      bias_offsets,
                                      bias_ids,
                                      bias_values,
                                      allowed_offsets,
                                      allowed_ids,
                                      draft_ids,
                                      typical_threshold,
                                      typical_alpha};
          },
          nb::kw_only(), arg("temperature").none() = nb::none(), arg("top_k").none() = nb::none(),
          arg("top_p").none() = nb::none(), arg("min_p").none() = nb::none(),
          arg("repetition_penalty").none() = nb::none(),
          arg("presence_penalty").none() = nb::none(), arg("frequency_penalty").none() = nb::none(),
          arg("seeds").none() = nb::none(), arg("generator_offsets").none() = nb::none(),
          arg("global_seed") = 0, arg("prompt_offsets").none() = nb::none(),
          arg("prompt_ids").none() = nb::none(), arg("output_offsets").none() = nb::none(),
          arg("output_ids").none() = nb::none(), arg("bias_offsets").none() = nb::none(),
          arg("bias_ids").none() = nb::none(), arg("bias_values").none() = nb::none(),
          arg("allowed_offsets").none() = nb::none(), arg("allowed_ids").none() = nb::none(),
          arg("draft_ids").none() = nb::none(), arg("typical_threshold") = 0.0f,
          arg("typical_alpha") = 0.0f)
      .def_ro("global_seed", &SamplingInputs::global_seed);
  m.def("sample", &sample, arg("logits"), arg("inputs"), arg("sampled"),
        arg("sampled_logprob").none() = nb::none(), arg("sampled_rank").none() = nb::none(),
        arg("top_logprobs").none() = nb::none(), arg("top_ids").none() = nb::none(),
        arg("workspace").none() = nb::none(), arg("stream") = 0,
        "Sample one token per logits row with the SamplingInputs (see "
        "fastllm/kernels/sampling.h for the semantics).");
  m.def("sampling_workspace_bytes", &k::sampling_workspace_bytes, arg("num_rows"), arg("vocab"),
        "Bytes of CUDA workspace sample() needs.");
  m.def("embed_quant_rows", &embed_quant_rows, arg("out"), arg("table"), arg("type"), arg("ids"),
        "out[i] = the dequantized row ids[i] of a Q8_0/Q4_0/Q4_1 table.");
  m.def("moe_route", &moe_route, arg("logits"), arg("top_k"), arg("renormalize"), arg("topk_ids"),
        arg("topk_weights"), arg("stream") = 0,
        "Mixture-of-experts routing: softmax over each row of float32 router logits, the top_k "
        "experts (int32 ids, largest first) and their probabilities (divided by their sum when "
        "renormalize).");
  m.def("moe_experts", &moe_experts, arg("out"), arg("input"), arg("topk_ids"), arg("topk_weights"),
        arg("gate_up"), arg("gate_up_type"), arg("down"), arg("down_type"), arg("intermediate"),
        arg("allow_simd") = true,
        "CPU: out[t] = sum_j topk_weights[t, j] * down_e(silu(gate_e x) * up_e x), e = "
        "topk_ids[t, j], experts grouped by expert over quant_gemm's layouts: gate_up uint8 "
        "[E * 2 intermediate] rows (gate rows then up rows per expert), down uint8 [E * hidden] "
        "rows.");
  m.def("moe_experts_float", &moe_experts_float, arg("out"), arg("input"), arg("topk_ids"),
        arg("topk_weights"), arg("gate_up"), arg("down"), arg("workspace"), arg("stream") = 0,
        "CUDA: the same over float weights gate_up [E, 2I, hidden], down [E, hidden, I] (a "
        "grouped GEMM).");
  m.def(
      "moe_experts_cuda_workspace_bytes",
      [](int64_t num_tokens, int64_t hidden, int64_t intermediate, int64_t num_experts,
         int64_t top_k) -> int64_t {
#ifdef FASTLLM_WITH_CUDA
        return k::moe_experts_cuda_workspace_bytes(num_tokens, hidden, intermediate, num_experts,
                                                   top_k);
#else
        (void)num_tokens, (void)hidden, (void)intermediate, (void)num_experts, (void)top_k;
        return 0;
#endif
      },
      arg("num_tokens"), arg("hidden"), arg("intermediate"), arg("num_experts"), arg("top_k"),
      "Bytes of CUDA workspace moe_experts_float needs (0 in a build without CUDA).");
  m.def("fp8_gemm", &fp8_gemm, arg("out"), arg("input"), arg("weight"), arg("scale"),
        arg("bias").none() = nb::none(), arg("stream") = 0,
        "out[m, n] = scale[n] * input[m, k] @ e4m3(W).T (+ bias) for W [n, k] e4m3fn codes "
        "(uint8, or a float8_e4m3fn tensor viewed as uint8), float accumulation.");
  m.def("quant_gemm", &quant_gemm, arg("out"), arg("input"), arg("weight"), arg("type"),
        arg("bias").none() = nb::none(), arg("allow_simd") = true, arg("stream") = 0,
        "out[m, n] = input[m, k] @ W.T (+ bias) for W [n, k] in a GGUF block type (ggml type id: "
        "2 Q4_0, 3 Q4_1, 8 Q8_0, 12 Q4_K, 14 Q6_K) stored as uint8 rows, or on the CPU in a "
        "repacked layout (1002 Q4_0x8, 1003 Q4_1x8: quant_repack; 1008 Q7_0x8: "
        "quant_pack_q7_0x8; 2008 Q8_0x8: quant_pack_q8_0x8) or as float32 rows (0 F32, a "
        "uint8 view: float dot products).");
  m.def(
      "quant_repack", &quant_repack, arg("weight"), arg("type"), arg("in_features"),
      "Rewrite a CPU uint8 [out_features, row_bytes] Q4_0 / Q4_1 weight in place into its "
      "8-row interleaved layout (1002 Q4_0x8, 1003 Q4_1x8; faster quant_gemm, same bytes) and "
      "return the new type id; returns type unchanged (bytes untouched) for other types (repacked "
      "ones included) or when out_features is not a multiple of 8.");
  m.def("quant_convert", &quant_convert, arg("out"), arg("weight"), arg("type"), arg("in_features"),
        arg("target"),
        "Write CPU weight rows of a GGUF type as target rows into out: Q4_K -> Q4_1 (3; scales "
        "rounded to fp16, nibbles kept) or any type -> Q8_0 (8; through float), so the integer "
        "GEMM kernels read them.");
  m.def(
      "quant_pack_q7_0x8",
      [](const Array& out, const SourceRows& weight, int64_t in_features) {
        quant_pack_q8_rows8("quant_pack_q7_0x8", out, weight, in_features, true);
      },
      arg("out"), arg("weight"), arg("in_features"),
      "Write CPU Q8_0 rows (out_features a multiple of 8) requantized to 7 bits into out, uint8 "
      "[out_features, in_features / 32 * 38], in the Q7_0x8 layout (type id 1008) that "
      "quant_gemm reads for output projections: its 7-bit activations halve the widening "
      "multiplies of Q8_0 on AVX2.");
  m.def(
      "quant_pack_q8_0x8",
      [](const Array& out, const SourceRows& weight, int64_t in_features) {
        quant_pack_q8_rows8("quant_pack_q8_0x8", out, weight, in_features, false);
      },
      arg("out"), arg("weight"), arg("in_features"),
      "Write CPU Q8_0 rows (out_features a multiple of 8) into out, uint8 [out_features, "
      "in_features / 32 * 38], in the Q8_0x8 layout (type id 2008; the same values) that "
      "quant_gemm reads for output projections and embed_quant_rows for a tied embedding.");
  m.def("quant_dequantize_rows", &quant_dequantize_rows, arg("out"), arg("weight"), arg("type"),
        "out (float32 [out_features, in_features]) = the CPU weight rows of any type or layout "
        "quant_gemm reads, dequantized as the GGUF loader does.");
  m.def("refine_top_logits", &refine_top_logits, arg("logits"), arg("input"), arg("weight"),
        arg("type"), arg("bias").none() = nb::none(), arg("count") = 0,
        "On the CPU, recompute in each row of logits = input @ W.T (+ bias), as quant_gemm "
        "wrote it, the count largest entries within 16 of the row's maximum as float dot "
        "products with W's dequantized rows (no activation rounding). F32 and K-quant weights "
        "are left as they are.");
  m.def(
      "quant_gemm_cpu_isa", [] { return std::string(k::quant_gemm_cpu_isa()); },
      "The CPU code path quant_gemm takes for Q8_0/Q4_0/Q4_1: 'avx512_vnni', 'avx_vnni', 'avx2' or "
      "'scalar' (env FASTLLM_CPU_ISA caps it).");
  m.def("lora_apply", &lora_apply, arg("out"), arg("input"), arg("token_slots"), arg("lora_a_ptrs"),
        arg("lora_b_ptrs"), arg("ranks"), arg("scales"), arg("stream") = 0, arg("max_rank") = 0,
        arg("workspace").none() = nb::none(), arg("b_transposed") = false,
        arg("weight_dtype") = "float32",
        "In place, for every token t with slot s = token_slots[t] >= 0 and lora_a_ptrs[s] != 0: "
        "out[t] += scales[s] * (input[t] @ A_s.T) @ B_s.T, where A_s is float32 [ranks[s], k] at "
        "address lora_a_ptrs[s] and B_s float32 [n, ranks[s]] at lora_b_ptrs[s] (contiguous). out "
        "[T, n] and input [T, k] are float32 with dense rows (out may be a column slice of a "
        "wider array); token_slots int32 [T]; the address arrays (uint64 or int64), ranks (int32) "
        "and scales (float32) are [num_slots], all on the tensors' device. max_rank bounds ranks "
        "(0 = 512); CUDA sizes its scratch by it and takes it from workspace (uint8, "
        "lora_workspace_bytes) when given. See fastllm/kernels/lora.h.");
  m.def("lora_workspace_bytes", &k::lora_workspace_bytes, arg("num_tokens"), arg("max_rank") = 0,
        "Bytes of CUDA scratch lora_apply needs for num_tokens tokens and ranks <= max_rank.");
  m.def(
      "lora_cpu_isa", [] { return std::string(k::lora_cpu_isa()); },
      "The CPU code path of lora_apply: 'avx512', 'avx2' or 'scalar' (env FASTLLM_CPU_ISA caps "
      "it).");
  m.def(
      "quant_block_info",
      [](int32_t type) {
        const auto t = static_cast<k::QuantType>(type);
        return std::make_pair(k::quant_block_values(t), k::quant_block_bytes(t));
      },
      arg("type"), "(values, bytes) per block of a ggml type id; (0, 0) when unsupported.");
}
