// embed_quant_rows_cpu: token embedding rows read out of a quantized table (see quant_gemm.h).
#include <string>

#include "fastllm/kernels/quant_gemm.h"
#include "quant_gemm_impl.h"

namespace fastllm::kernels {

void embed_quant_rows_cpu(const void* table, QuantType type, int64_t num_rows, int64_t dim,
                          const int32_t* ids, int64_t num_ids, float* out) {
  const QuantType base = quant_base_type(type);
  check_arg(base == QuantType::kQ8_0 || base == QuantType::kQ4_0 || base == QuantType::kQ4_1,
            std::string("embed_quant_rows: cannot read ") + quant_type_name(type) + " rows");
  check_arg(dim > 0 && dim % 32 == 0, "embed_quant_rows: dim must be a multiple of 32");
  for (int64_t i = 0; i < num_ids; ++i) {
    check_arg(ids[i] >= 0 && ids[i] < num_rows,
              "embed_quant_rows: token id " + std::to_string(ids[i]) + " out of range");
    cpu::dequantize_weight_row(type, table, dim, ids[i], out + i * dim);
  }
}

}  // namespace fastllm::kernels
