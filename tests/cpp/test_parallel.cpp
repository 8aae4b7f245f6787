// The CPU kernels' fork-join pool: parallel_for returns only after every item ran exactly once,
// with back-to-back jobs of varying sizes (a worker still holding a finished job's claim word
// must never run an item of the next job), and rethrows a task's exception.
#include <gtest/gtest.h>

#include <atomic>
#include <memory>
#include <random>
#include <stdexcept>
#include <vector>

#include "parallel.h"

using fastllm::kernels::cpu::parallel_for;

TEST(ParallelFor, EveryItemRunsExactlyOnceBeforeReturn) {
  std::mt19937 rng(7);
  for (int job = 0; job < 400000; ++job) {
    const int count = 2 + static_cast<int>(rng() % 7);
    const int spin = static_cast<int>(rng() % 200);
    // Heap state freed right after the call, as kernels' closures are: a late item would show.
    auto runs = std::make_unique<std::vector<std::atomic<int>>>(count);
    auto live = std::make_unique<std::atomic<bool>>(true);
    std::atomic<int> late{0};
    parallel_for(count, [&, spin](int64_t i) {
      volatile int x = 0;
      for (int k = 0; k < spin * static_cast<int>(i + 1); ++k) x = x + k;
      (*runs)[i].fetch_add(1);
      if (!live->load()) late.fetch_add(1);
    });
    live->store(false);
    for (int i = 0; i < count; ++i)
      ASSERT_EQ((*runs)[i].load(), 1) << "job " << job << " item " << i;
    ASSERT_EQ(late.load(), 0) << "job " << job;
  }
}

TEST(ParallelFor, LargeCountsRunInRanges) {
  const int64_t count = (int64_t{1} << 20) + 3;
  std::vector<uint8_t> seen(count, 0);
  parallel_for(count, [&](int64_t i) { seen[i] += 1; });
  for (int64_t i = 0; i < count; ++i) ASSERT_EQ(seen[i], 1) << i;
}

TEST(ParallelFor, RethrowsATaskException) {
  EXPECT_THROW(parallel_for(64,
                            [](int64_t i) {
                              if (i == 17) throw std::runtime_error("item 17");
                            }),
               std::runtime_error);
  std::atomic<int> after{0};
  parallel_for(8, [&](int64_t) { after.fetch_add(1); });
  EXPECT_EQ(after.load(), 8);
}
