// Shared vocabulary of the kernel API: dtypes, devices and argument checks.
// Kernels take raw pointers, sizes and a stream; nothing here depends on torch or Python.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace fastllm::kernels {

// Element types of activations and KV caches. kFloat8E4M3 is OCP e4m3fn (no infinities, max 448),
// the layout of torch.float8_e4m3fn; kFloat8E5M2 is OCP e5m2 (torch.float8_e5m2: float16's top
// byte, max finite 57344). The float8 types are used for KV caches only, with a per-tensor scale.
enum class DType : int32_t {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kFloat8E4M3 = 3,
  kFloat8E5M2 = 4
};

// True for the one-byte float types (KV caches only: never activations).
inline bool is_float8(DType dtype) {
  return dtype == DType::kFloat8E4M3 || dtype == DType::kFloat8E5M2;
}

enum class Device : int32_t { kCPU = 0, kCUDA = 1 };

// Raised for shapes, dtypes or devices a kernel cannot handle; bindings map it to ValueError.
class KernelArgumentError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

inline void check_arg(bool ok, const std::string& message) {
  if (!ok) throw KernelArgumentError(message);
}

// Bytes per element of dtype.
inline size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return 4;
    case DType::kFloat16:
    case DType::kBFloat16:
      return 2;
    case DType::kFloat8E4M3:
    case DType::kFloat8E5M2:
      return 1;
  }
  return 0;
}

// Lower-case name ("float32", "float16", "bfloat16", "float8_e4m3", "float8_e5m2") for messages.
const char* dtype_name(DType dtype);

// True when the library was built with CUDA (or HIP) kernels.
bool built_with_cuda();

// Number of worker threads the CPU kernels use (env FASTLLM_CPU_THREADS, default: all cores).
int cpu_num_threads();

// Names of the CPU code paths picked at run time ("avx2" or "scalar").
const char* cpu_isa();
// The code path of the CPU paged attention's score and value kernels: "avx512", "avx2" or
// "scalar" (cpu_isa() stays "avx2" when the attention takes AVX-512).
const char* attention_cpu_isa();

}  // namespace fastllm::kernels
