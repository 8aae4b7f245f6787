// Helpers shared by the C++ benchmarks: positional arguments and the median of samples.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <vector>

namespace fastllm::bench {

// argv[i] as an integer, or `fallback` when there are fewer arguments.
inline long arg(int argc, char** argv, int i, long fallback) {
  return argc > i ? std::strtol(argv[i], nullptr, 10) : fallback;
}

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace fastllm::bench
