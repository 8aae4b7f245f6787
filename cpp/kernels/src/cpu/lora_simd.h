// The CPU LoRA micro-kernels, written once over a vector type V and compiled once per instruction
// set: lora.cpp (plain C++), lora_avx2.cpp and lora_avx512.cpp include this after defining V.
// Everything here sits in an anonymous namespace, so each file keeps its own copy built with its
// own flags (no inline function is shared between files compiled for different CPUs).
//
// V provides: Reg, kWidth (floats per Reg), zero(), set1(f), load(p), load_partial(p, n) (the
// first n < kWidth floats, zeros after; reads nothing past p + n) for float and float16 (uint16_t
// bits) pointers, to_float(h) for one float16, store(p, v), fma(a, b, c) = a * b + c per lane,
// fma1(a, b, c) the same on one float with the same rounding as a lane of fma, sum(v) (a fixed
// reduction order), and kRegs (vector registers the instruction set has: tiles are sized by it).
// The weights (A, B) are float or float16 (W); activations are float.
//
// Batch invariance: every h[t][r] is one accumulator over k in chunks of kWidth from 0, then
// sum(); every out[t][j] is one accumulator over r from 0, then out += scale * acc in one fma.
// Neither depends on how the tokens and ranks around it are tiled, so a token's result is the
// same bits alone or in any batch.
#pragma once

#include <algorithm>
#include <cstdint>

#include "lora_impl.h"

namespace fastllm::kernels::cpu {
namespace {

// TT tokens x TR rank rows of the shrink: h[t][q] = x[t] . a[q], the rows of a k apart. Every
// pair keeps its own accumulator (TT * TR of them hide the FMA latency); x and a are loaded once
// per chunk for the whole tile.
template <class V>
inline float as_float(float x) {
  return x;
}
template <class V>
inline float as_float(uint16_t h) {
  return V::to_float(h);
}

template <class V, class W, int TT, int TR>
inline void shrink_tile(const float* const* x, const W* a, int64_t k, float* const* h) {
  using Reg = typename V::Reg;
  Reg acc[TT][TR];
  for (int t = 0; t < TT; ++t)
    for (int q = 0; q < TR; ++q) acc[t][q] = V::zero();
  int64_t i = 0;
  for (; i + V::kWidth <= k; i += V::kWidth) {
    Reg xv[TT];
    for (int t = 0; t < TT; ++t) xv[t] = V::load(x[t] + i);
    for (int q = 0; q < TR; ++q) {
      const Reg av = V::load(a + q * k + i);
      for (int t = 0; t < TT; ++t) acc[t][q] = V::fma(xv[t], av, acc[t][q]);
    }
  }
  if (i < k) {  // the last partial chunk, zero-padded, in the same lanes alone or in a tile
    const int rest = static_cast<int>(k - i);
    Reg xv[TT];
    for (int t = 0; t < TT; ++t) xv[t] = V::load_partial(x[t] + i, rest);
    for (int q = 0; q < TR; ++q) {
      const Reg av = V::load_partial(a + q * k + i, rest);
      for (int t = 0; t < TT; ++t) acc[t][q] = V::fma(xv[t], av, acc[t][q]);
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int q = 0; q < TR; ++q) h[t][q] = V::sum(acc[t][q]);
}

// Rank rows [r0, r1) for TT tokens whose input rows are x and h rows are h.
template <class V, class W, int TT>
inline void shrink_rows(const float* const* x, const W* a, int64_t k, int64_t r0, int64_t r1,
                        float* const* h) {
  // One token (decode) needs more rows per tile to keep enough accumulators in flight; with 32
  // registers, 4 tokens x 4 rows share each loaded x and a chunk among 16 accumulators.
  constexpr int kRows = TT == 1 ? 8 : (V::kRegs >= 32 ? 4 : 2);
  float* hr[TT];
  auto at = [&](int64_t r) {
    for (int t = 0; t < TT; ++t) hr[t] = h[t] + r;
    return a + r * k;
  };
  int64_t r = r0;
  for (; r + kRows <= r1; r += kRows) shrink_tile<V, W, TT, kRows>(x, at(r), k, hr);
  if constexpr (kRows > 2) {
    for (; r + 2 <= r1; r += 2) shrink_tile<V, W, TT, 2>(x, at(r), k, hr);
  }
  for (; r < r1; ++r) shrink_tile<V, W, TT, 1>(x, at(r), k, hr);
}

template <class V, class W>
void shrink(const float* input, int64_t input_stride, const int64_t* tokens, int64_t count,
            const void* weights, int64_t k, int64_t r0, int64_t r1, float* h, int64_t h_stride) {
  const W* a = static_cast<const W*>(weights);
  constexpr int kTokens = 4;
  int64_t i = 0;
  for (; i + kTokens <= count; i += kTokens) {
    const float* x[kTokens];
    float* hp[kTokens];
    for (int t = 0; t < kTokens; ++t) {
      x[t] = input + tokens[i + t] * input_stride;
      hp[t] = h + (i + t) * h_stride;
    }
    shrink_rows<V, W, kTokens>(x, a, k, r0, r1, hp);
  }
  for (; i < count; ++i) {
    const float* x[1] = {input + tokens[i] * input_stride};
    float* hp[1] = {h + i * h_stride};
    shrink_rows<V, W, 1>(x, a, k, r0, r1, hp);
  }
}

// NV vectors of columns of one token: out[c] += scale * sum_r h[r] * bt[r][c], the rows of bt ldb
// floats apart.
template <class V, class W, int NV>
inline void expand_vectors(const float* h, int64_t rank, const W* bt, int64_t ldb, float scale,
                           float* out) {
  using Reg = typename V::Reg;
  Reg acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = V::zero();
  for (int64_t r = 0; r < rank; ++r) {
    const Reg hv = V::set1(h[r]);
    const W* row = bt + r * ldb;
    for (int v = 0; v < NV; ++v) acc[v] = V::fma(hv, V::load(row + v * V::kWidth), acc[v]);
  }
  const Reg s = V::set1(scale);
  for (int v = 0; v < NV; ++v) {
    float* o = out + v * V::kWidth;
    V::store(o, V::fma(s, acc[v], V::load(o)));
  }
}

// One token over columns [c0, cols) of a tile (src as in expand_tile): whole blocks of vectors,
// single vectors, then the columns past the last vector.
template <class V, class W>
inline void expand_columns(const float* hi, int64_t rank, const W* src, int64_t ld, int64_t c0,
                           int64_t cols, float scale, float* o) {
  constexpr int kVectors = 8;  // accumulators in flight
  constexpr int64_t kBlock = kVectors * V::kWidth;
  int64_t c = c0;
  for (; c + kBlock <= cols; c += kBlock)
    expand_vectors<V, W, kVectors>(hi, rank, src + c, ld, scale, o + c);
  for (; c + V::kWidth <= cols; c += V::kWidth)
    expand_vectors<V, W, 1>(hi, rank, src + c, ld, scale, o + c);
  // The same fma chain as a lane, so the same bits.
  for (; c < cols; ++c) {
    float acc = 0.0f;
    for (int64_t r = 0; r < rank; ++r) acc = V::fma1(hi[r], as_float<V>(src[r * ld + c]), acc);
    o[c] = V::fma1(scale, acc, o[c]);
  }
}

// TT tokens x NV vectors of columns: out_t[c] += scale * sum_r h_t[r] * bt[r][c], the rows of bt
// ldb floats apart. Each loaded vector of B serves all TT tokens; every output keeps its own
// accumulator over r from 0, so the bits are those of one token alone (expand_vectors).
template <class V, class W, int TT, int NV>
inline void expand_tokens(const float* const* h, int64_t rank, const W* bt, int64_t ldb,
                          float scale, float* const* out) {
  using Reg = typename V::Reg;
  Reg acc[TT][NV];
  for (int t = 0; t < TT; ++t)
    for (int v = 0; v < NV; ++v) acc[t][v] = V::zero();
  for (int64_t r = 0; r < rank; ++r) {
    const W* row = bt + r * ldb;
    Reg bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = V::load(row + v * V::kWidth);
    for (int t = 0; t < TT; ++t) {
      const Reg hv = V::set1(h[t][r]);
      for (int v = 0; v < NV; ++v) acc[t][v] = V::fma(hv, bv[v], acc[t][v]);
    }
  }
  const Reg s = V::set1(scale);
  for (int t = 0; t < TT; ++t)
    for (int v = 0; v < NV; ++v) {
      float* o = out[t] + v * V::kWidth;
      V::store(o, V::fma(s, acc[t][v], V::load(o)));
    }
}

// One token block over columns [0, cols) of a tile: src[r * ld + c] is B[c][r] (W values).
template <class V, class W>
void expand_tile(float* out, int64_t out_stride, const int64_t* tokens, int64_t count,
                 const float* h, int64_t h_stride, const W* src, int64_t ld, int64_t rank,
                 int64_t tile, int64_t cols, float scale) {
  // Tokens per group and vectors per token: TT * NV accumulators plus NV loaded vectors and a
  // broadcast fit the registers.
  constexpr int TT = V::kRegs >= 32 ? 4 : 2;
  constexpr int NV = 4;
  constexpr int64_t kBlock = NV * V::kWidth;
  int64_t i = 0;
  for (; i + TT <= count; i += TT) {
    float* o[TT];
    const float* hi[TT];
    for (int t = 0; t < TT; ++t) {
      o[t] = out + tokens[i + t] * out_stride + tile;
      hi[t] = h + (i + t) * h_stride;
    }
    int64_t c = 0;
    for (; c + kBlock <= cols; c += kBlock) {
      float* oc[TT];
      for (int t = 0; t < TT; ++t) oc[t] = o[t] + c;
      expand_tokens<V, W, TT, NV>(hi, rank, src + c, ld, scale, oc);
    }
    for (int t = 0; t < TT; ++t) expand_columns<V, W>(hi[t], rank, src, ld, c, cols, scale, o[t]);
  }
  for (; i < count; ++i) {
    const float* hi = h + i * h_stride;
    expand_columns<V, W>(hi, rank, src, ld, 0, cols, scale, out + tokens[i] * out_stride + tile);
  }
}

template <class V, class W>
void expand(float* out, int64_t out_stride, const int64_t* tokens, int64_t count, const float* h,
            int64_t h_stride, const void* weights, int64_t rank, int64_t c0, int64_t c1,
            float scale, float* bt, int64_t b_t_stride) {
  const W* b = static_cast<const W*>(weights);
  for (int64_t tile = c0; tile < c1; tile += kLoraColumnTile) {
    const int64_t cols = std::min(kLoraColumnTile, c1 - tile);
    // Each rank step reads contiguous columns: B as the executors keep it (transposed), or a
    // tile of PEFT's [n][rank] B transposed (to float) here once for all the tokens of the
    // segment. Either way a product reads the same value, so the bits agree.
    if (b_t_stride > 0) {
      expand_tile<V, W>(out, out_stride, tokens, count, h, h_stride, b + tile, b_t_stride, rank,
                        tile, cols, scale);
      continue;
    }
    for (int64_t c = 0; c < cols; ++c) {
      const W* row = b + (tile + c) * rank;
      for (int64_t r = 0; r < rank; ++r) bt[r * cols + c] = as_float<V>(row[r]);
    }
    expand_tile<V, float>(out, out_stride, tokens, count, h, h_stride, bt, cols, rank, tile, cols,
                          scale);
  }
}

template <class V>
constexpr LoraKernels make_lora_kernels(const char* name) {
  return LoraKernels{name, shrink<V, float>, expand<V, float>, shrink<V, uint16_t>,
                     expand<V, uint16_t>};
}

}  // namespace
}  // namespace fastllm::kernels::cpu
