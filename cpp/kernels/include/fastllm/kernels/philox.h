// Philox4x32-10 counter-based random numbers (Salmon et al., SC'11), identical on host and device.
// Sampling keys it with the request seed and counts with the request's output position, so a seeded
// request draws the same numbers whatever its row in the batch and whichever device runs it.
#pragma once

#include <cstdint>

#include "fastllm/kernels/dtype_convert.h"

namespace fastllm::kernels {

struct Philox4 {
  uint32_t v[4];
};

FASTLLM_HOST_DEVICE void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = uint64_t(a) * uint64_t(b);
  hi = uint32_t(product >> 32);
  lo = uint32_t(product);
}

// Ten rounds of Philox4x32 on counter c with key (k0, k1).
FASTLLM_HOST_DEVICE Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(0xD2511F53u, c.v[0], hi0, lo0);
    philox_mulhilo(0xCD9E8D57u, c.v[2], hi1, lo1);
    c = Philox4{{hi1 ^ c.v[1] ^ k0, lo1, hi0 ^ c.v[3] ^ k1, lo0}};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

// Uniform float in the open interval (0, 1) from 32 random bits (23 bits of resolution).
FASTLLM_HOST_DEVICE float philox_uniform(uint32_t bits) {
  return (float(bits >> 9) + 0.5f) * 1.1920928955078125e-07f;
}

// The random stream of one sampling row. Seeded rows: key = seed, counter words 2-3 = generator
// offset (the request's output position), word 1 = 0. Unseeded rows: key = the engine seed, words
// 2-3 = the offset the engine passes (its step counter), word 1 = row index + 1. Word 0 = token/4.
struct SamplingStream {
  uint32_t key0, key1, row_word, offset_lo, offset_hi;

  FASTLLM_HOST_DEVICE static SamplingStream make(int64_t seed, uint64_t global_seed, int64_t offset,
                                                 int64_t row) {
    SamplingStream s;
    const uint64_t key = seed >= 0 ? uint64_t(seed) : global_seed;
    s.key0 = uint32_t(key);
    s.key1 = uint32_t(key >> 32);
    s.row_word = seed >= 0 ? 0u : uint32_t(row + 1);
    s.offset_lo = uint32_t(uint64_t(offset));
    s.offset_hi = uint32_t(uint64_t(offset) >> 32);
    return s;
  }

  // Four uniforms for tokens 4*group .. 4*group+3.
  FASTLLM_HOST_DEVICE Philox4 block(uint32_t group) const {
    return philox4x32_10(Philox4{{group, row_word, offset_lo, offset_hi}}, key0, key1);
  }
};

}  // namespace fastllm::kernels
