// Internal: the fake model's 64-bit mixing function (nothing that must resist collisions).
#pragma once

#include <cstdint>

namespace fastllm::detail {

// splitmix64 finalizer: a cheap, well-mixing 64-bit permutation.
inline uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace fastllm::detail
