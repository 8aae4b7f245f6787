// Argument checks shared by the kernel and decoder bindings: every array crossing into C++ is
// checked for dtype, device and layout here, so the kernels see only valid raw pointers.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <optional>
#include <string>

#include "fastllm/kernels/common.h"

namespace fastllm::bindings {

namespace nb = nanobind;
namespace k = fastllm::kernels;

using Array = nb::ndarray<>;
using k::check_arg;

inline std::string where(const char* op, const char* name) { return std::string(op) + ": " + name; }

inline bool is_cuda(const Array& a) { return a.device_type() == nb::device::cuda::value; }

inline void check_device(const Array& a, bool cuda, const char* op, const char* name) {
  const bool ok = cuda ? is_cuda(a) : a.device_type() == nb::device::cpu::value;
  check_arg(ok, where(op, name) + (cuda ? " must be a CUDA tensor like the others"
                                        : " must be a CPU tensor like the others"));
}

// The activation dtype of a float tensor. A uint8 array is a float8 KV cache where fp8 names its
// format (DLPack and numpy have no portable float8 codes, so the caller says which).
inline k::DType float_dtype(const Array& a, const char* op, const char* name,
                            std::optional<k::DType> fp8 = std::nullopt) {
  const auto dt = a.dtype();
  if (dt == nb::dtype<float>()) return k::DType::kFloat32;
  if (dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float) && dt.bits == 16)
    return k::DType::kFloat16;
  if (dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat) && dt.bits == 16)
    return k::DType::kBFloat16;
  if (fp8 && dt == nb::dtype<uint8_t>()) return *fp8;
  throw k::KernelArgumentError(where(op, name) + " must be float32, float16 or bfloat16" +
                               (fp8 ? " (or a uint8 view of a float8 cache)" : ""));
}

// The float8 type a KV cache's fp8_format argument names: "e4m3" (e4m3fn) or "e5m2".
inline k::DType fp8_format(const std::string& format, const char* op) {
  if (format == "e4m3") return k::DType::kFloat8E4M3;
  if (format == "e5m2") return k::DType::kFloat8E5M2;
  throw k::KernelArgumentError(where(op, "fp8_format must be 'e4m3' or 'e5m2', got '") + format +
                               "'");
}

// Dimensions [from, ndim) packed densely (dimension from-1 may have any stride). An array with
// no elements is dense whatever its strides: numpy >= 2.4 gives empty arrays stride 0.
inline void check_dense_from(const Array& a, size_t from, const char* op, const char* name) {
  for (size_t d = 0; d < a.ndim(); ++d)
    if (a.shape(d) == 0) return;
  int64_t expected = 1;
  for (size_t d = a.ndim(); d-- > from;) {
    check_arg(a.shape(d) == 1 || a.stride(d) == expected,
              where(op, name) + " must be contiguous in its inner dimensions");
    expected *= static_cast<int64_t>(a.shape(d));
  }
}

inline void check_contiguous(const Array& a, const char* op, const char* name) {
  check_dense_from(a, 0, op, name);
}

inline int64_t numel(const Array& a) {
  int64_t n = 1;
  for (size_t d = 0; d < a.ndim(); ++d) n *= static_cast<int64_t>(a.shape(d));
  return n;
}

// A contiguous integer (or float) array of the given element type on the expected device.
template <typename T>
T* typed(const Array& a, bool cuda, const char* op, const char* name) {
  check_arg(a.dtype() == nb::dtype<T>(), where(op, name) + " has the wrong dtype");
  check_device(a, cuda, op, name);
  check_contiguous(a, op, name);
  return static_cast<T*>(a.data());
}

template <typename T>
T* typed_or_null(const Array& a, bool cuda, const char* op, const char* name) {
  return a.is_valid() ? typed<T>(a, cuda, op, name) : nullptr;
}

}  // namespace fastllm::bindings
