// The AVX2 quantized GEMM micro-kernels again, with AVX-VNNI dot products (vpdpbusd). Built with
// -mavx2 -mfma -mf16c -mavxvnni where the compiler knows the flag; picked at run time only on CPUs
// that report avxvnni.
#define FASTLLM_QUANT_GEMM_VNNI 1
#include "quant_gemm_avx2.cpp"
