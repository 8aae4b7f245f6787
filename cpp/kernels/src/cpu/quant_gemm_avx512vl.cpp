// The AVX2 quantized GEMM micro-kernels again, with the EVEX (AVX-512 VL + VNNI) form of the
// 256-bit vpdpbusd. Built with the AVX-512 kernels' flags; the AVX-512 kernels use it for 1-2
// rows and the x8 layouts, so a CPU with AVX-512 VNNI but no AVX-VNNI (Ice Lake, Zen 4) gets
// VNNI dot products there too (the 8-bit output projection is ~1.5x slower without them).
#define FASTLLM_QUANT_GEMM_VNNI 2
#include "quant_gemm_avx2.cpp"
