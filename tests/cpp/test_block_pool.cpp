#include <gtest/gtest.h>

#include <algorithm>
#include <random>

#include "fastllm/block_pool.h"
#include "fastllm/errors.h"

using fastllm::BlockPool;

namespace {

// A digest for the index tests, which only need distinct (or equal) keys.
fastllm::BlockHash H(uint64_t v) {
  fastllm::BlockHash h;
  h.words[0] = v;
  return h;
}

std::vector<int32_t> allocate(BlockPool& pool, int32_t n) {
  std::vector<int32_t> out;
  pool.allocate(n, out);
  return out;
}

}  // namespace

TEST(BlockPool, NullBlockIsNeverHandedOut) {
  BlockPool pool(4);
  EXPECT_EQ(pool.num_free_blocks(), 3);
  EXPECT_EQ(pool.num_touched_blocks(), 0);
  std::vector<int32_t> got;
  pool.allocate(3, got);
  EXPECT_EQ(got, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_FALSE(pool.can_allocate(1));
  EXPECT_THROW(pool.allocate(1, got), fastllm::EngineError);
  EXPECT_DOUBLE_EQ(pool.usage(), 1.0);
  EXPECT_EQ(pool.num_touched_blocks(), 3);
}

TEST(BlockPool, EmptyAndNullOnlyPoolsHaveNothingToHandOut) {
  for (int32_t n : {0, 1}) {
    BlockPool pool(n);
    EXPECT_EQ(pool.num_free_blocks(), 0);
    EXPECT_EQ(pool.num_touched_blocks(), 0);
    EXPECT_TRUE(pool.can_allocate(0));
    EXPECT_FALSE(pool.can_allocate(1));
  }
}

TEST(BlockPool, FreshBlocksComeOutInIncreasingOrder) {
  BlockPool pool(7);
  EXPECT_EQ(allocate(pool, 2), (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(pool.num_touched_blocks(), 2);
  EXPECT_EQ(pool.num_free_blocks(), 4);
  EXPECT_EQ(allocate(pool, 3), (std::vector<int32_t>{3, 4, 5}));
  EXPECT_EQ(pool.num_touched_blocks(), 5);
  EXPECT_EQ(pool.num_free_blocks(), 1);
  EXPECT_DOUBLE_EQ(pool.usage(), 5.0 / 6.0);
}

TEST(BlockPool, UncachedFreedBlocksAreReusedMostRecentFirstBeforeFreshOnes) {
  BlockPool pool(8);
  std::vector<int32_t> a = allocate(pool, 4);  // 1 2 3 4
  pool.release(&a[2], 1);                      // 3 freed first
  pool.release(&a[0], 1);                      // then 1
  EXPECT_EQ(pool.num_free_blocks(), 5);        // 1 and 3, plus fresh 5 6 7
  EXPECT_EQ(allocate(pool, 2), (std::vector<int32_t>{1, 3}));
  EXPECT_EQ(pool.num_touched_blocks(), 4);
  EXPECT_EQ(allocate(pool, 1), (std::vector<int32_t>{5}));
  EXPECT_EQ(pool.num_touched_blocks(), 5);
}

TEST(BlockPool, UncachedFreedBlockIsReusedBeforeCachedAndFreshOnes) {
  BlockPool pool(8, /*cache_headroom=*/0.0);
  std::vector<int32_t> a = allocate(pool, 4);  // 1 2 3 4
  pool.register_block(1, H(11));
  pool.register_block(2, H(22));
  // Interleave cached and uncached releases: free list becomes 4 3 | 1 2.
  for (int32_t b : {1, 3, 2, 4}) pool.release(&b, 1);
  EXPECT_EQ(pool.num_free_blocks(), 7);
  EXPECT_EQ(allocate(pool, 1), (std::vector<int32_t>{4}));
  EXPECT_EQ(allocate(pool, 1), (std::vector<int32_t>{3}));
  EXPECT_EQ(pool.lookup(H(11)), 1);  // no cached block evicted while uncached ones were free
  EXPECT_EQ(pool.lookup(H(22)), 2);
  EXPECT_EQ(allocate(pool, 1), (std::vector<int32_t>{1}));
  EXPECT_EQ(pool.lookup(H(11)), -1);
  EXPECT_EQ(pool.lookup(H(22)), 2);
  EXPECT_FALSE(pool.is_registered(1));
  EXPECT_EQ(allocate(pool, 1), (std::vector<int32_t>{2}));
  EXPECT_EQ(pool.lookup(H(22)), -1);
  EXPECT_EQ(pool.num_cached_blocks(), 0);
  EXPECT_EQ(pool.num_touched_blocks(), 4);
  // The free list is empty now: only then are fresh blocks taken.
  EXPECT_EQ(allocate(pool, 2), (std::vector<int32_t>{5, 6}));
  EXPECT_EQ(pool.num_touched_blocks(), 6);
}

TEST(BlockPool, CachedBlocksAreEvictedInLruOrder) {
  BlockPool pool(7, /*cache_headroom=*/0.0);
  std::vector<int32_t> a = allocate(pool, 4);  // 1 2 3 4
  for (int32_t b : a) pool.register_block(b, H(100 + b));
  for (int32_t b : {2, 4, 1, 3}) pool.release(&b, 1);
  EXPECT_EQ(pool.num_cached_blocks(), 4);
  const std::vector<int32_t> expected = {2, 4, 1, 3};
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(allocate(pool, 1), (std::vector<int32_t>{expected[i]}));
    EXPECT_EQ(pool.lookup(H(100 + expected[i])), -1);
    for (size_t j = i + 1; j < expected.size(); ++j) {
      EXPECT_EQ(pool.lookup(H(100 + expected[j])), expected[j]);
    }
  }
  EXPECT_EQ(pool.num_touched_blocks(), 4);
}

TEST(BlockPool, ReleaseReversedEvictsTheEndOfASequenceFirst) {
  BlockPool pool(5, /*cache_headroom=*/0.0);
  std::vector<int32_t> a = allocate(pool, 3);  // 1 2 3
  for (int32_t b : a) pool.register_block(b, H(10 + b));
  pool.release_reversed(a);  // cached: 3 joins the tail first, so it is evicted first
  EXPECT_EQ(allocate(pool, 3), (std::vector<int32_t>{3, 2, 1}));
}

TEST(BlockPool, ReleaseReversedOfUncachedBlocksKeepsTheirOrder) {
  BlockPool pool(5);
  std::vector<int32_t> a = allocate(pool, 3);  // 1 2 3
  pool.release_reversed(a);                    // each joins the head: 1 2 3
  EXPECT_EQ(allocate(pool, 3), (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(pool.num_touched_blocks(), 3);
}

TEST(BlockPool, ReleaseReversedPutsAPartialLastBlockFirstAndThePrefixLast) {
  BlockPool pool(6, /*cache_headroom=*/0.0);
  std::vector<int32_t> a = allocate(pool, 3);  // 1 2 full and cached, 3 partial
  pool.register_block(1, H(11));
  pool.register_block(2, H(22));
  pool.release_reversed(a);  // free list: 3 | 2 1
  EXPECT_EQ(allocate(pool, 2), (std::vector<int32_t>{3, 2}));
  EXPECT_EQ(pool.lookup(H(11)), 1);
  EXPECT_EQ(pool.lookup(H(22)), -1);
}

TEST(BlockPool, RefCountsKeepSharedBlocksOutOfTheFreeList) {
  BlockPool pool(3);
  std::vector<int32_t> a;
  pool.allocate(1, a);
  pool.touch(a[0]);
  EXPECT_EQ(pool.ref_count(a[0]), 2);
  pool.release(&a[0], 1);
  EXPECT_EQ(pool.num_free_blocks(), 1);
  pool.release(&a[0], 1);
  EXPECT_EQ(pool.num_free_blocks(), 2);
  EXPECT_THROW(pool.release(&a[0], 1), fastllm::EngineError);
  const int32_t null_block = BlockPool::kNullBlock;
  EXPECT_THROW(pool.release(&null_block, 1), fastllm::EngineError);
}

TEST(BlockPool, CachedBlocksSurviveFreeAndAreEvictedLazily) {
  BlockPool pool(5, /*cache_headroom=*/0.0);
  std::vector<int32_t> a = allocate(pool, 3);  // 1 2 3
  pool.register_block(a[0], H(111));
  pool.register_block(a[1], H(222));
  pool.release_reversed(a);  // free list: 3 | 2 1, fresh: 4
  EXPECT_EQ(pool.lookup(H(111)), 1);
  EXPECT_EQ(pool.lookup(H(222)), 2);
  EXPECT_EQ(pool.num_free_blocks(), 4);
  // Taking a cached block back removes it from the free list without evicting anything.
  pool.touch(1);
  EXPECT_EQ(pool.ref_count(1), 1);
  EXPECT_EQ(pool.num_free_blocks(), 3);
  EXPECT_EQ(pool.lookup(H(111)), 1);
  // Allocation takes 3 (never cached) and then 2, evicting hash 222 only now; block 1 is held, so
  // the next one is fresh.
  EXPECT_EQ(allocate(pool, 1), (std::vector<int32_t>{3}));
  EXPECT_EQ(pool.lookup(H(222)), 2);
  EXPECT_EQ(allocate(pool, 1), (std::vector<int32_t>{2}));
  EXPECT_EQ(pool.lookup(H(222)), -1);
  EXPECT_EQ(pool.lookup(H(111)), 1);
  EXPECT_EQ(pool.num_touched_blocks(), 3);
  EXPECT_EQ(allocate(pool, 1), (std::vector<int32_t>{4}));
  EXPECT_EQ(pool.num_touched_blocks(), 4);
  // The block taken back is cached, so releasing it sends it to the tail again.
  pool.release(&a[0], 1);
  EXPECT_EQ(pool.lookup(H(111)), 1);
  EXPECT_EQ(allocate(pool, 1), (std::vector<int32_t>{1}));
  EXPECT_EQ(pool.lookup(H(111)), -1);
}

TEST(BlockPool, PrefixHitLeavesTheFreeListFromTheMiddle) {
  BlockPool pool(6, /*cache_headroom=*/0.0);
  std::vector<int32_t> a = allocate(pool, 3);  // 1 2 3
  for (int32_t b : a) pool.register_block(b, H(10 + b));
  pool.release_reversed(a);  // free list: 3 2 1
  const int32_t hit = pool.lookup(H(12));
  ASSERT_EQ(hit, 2);
  pool.touch(hit);
  EXPECT_EQ(allocate(pool, 2), (std::vector<int32_t>{3, 1}));
  EXPECT_EQ(allocate(pool, 1), (std::vector<int32_t>{4}));  // list empty: block 2 is held
  EXPECT_EQ(pool.lookup(H(12)), 2);
  EXPECT_EQ(pool.num_touched_blocks(), 4);
}

TEST(BlockPool, TouchedBlocksGrowOnlyWhenTheFreeListIsEmpty) {
  BlockPool pool(10);
  std::vector<int32_t> a = allocate(pool, 3);
  EXPECT_EQ(pool.num_touched_blocks(), 3);
  pool.release(&a[1], 1);
  EXPECT_EQ(pool.num_touched_blocks(), 3);
  // One block comes from the free list, the second one is fresh.
  EXPECT_EQ(allocate(pool, 2), (std::vector<int32_t>{2, 4}));
  EXPECT_EQ(pool.num_touched_blocks(), 4);
  pool.release_reversed(a);  // 3 2 1 all back: list 1 2 3 (2 was re-held, released again)
  EXPECT_EQ(pool.num_touched_blocks(), 4);
  EXPECT_EQ(allocate(pool, 3), (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(pool.num_touched_blocks(), 4);
}

TEST(BlockPool, TouchAndRegisterRejectBlocksNeverHandedOut) {
  BlockPool pool(4);
  allocate(pool, 1);
  EXPECT_THROW(pool.touch(2), fastllm::EngineError);
  EXPECT_THROW(pool.register_block(3, H(9)), fastllm::EngineError);
  EXPECT_EQ(pool.num_free_blocks(), 2);
  EXPECT_EQ(pool.lookup(H(9)), -1);
  EXPECT_EQ(allocate(pool, 2), (std::vector<int32_t>{2, 3}));
}

TEST(BlockPool, RegisteringAnUnreferencedBlockMovesItAmongTheCachedOnes) {
  BlockPool pool(4);
  std::vector<int32_t> a = allocate(pool, 2);
  pool.release_reversed(a);      // free list: 1 2
  pool.register_block(1, H(9));  // free list: 2 | 1
  EXPECT_EQ(allocate(pool, 1), (std::vector<int32_t>{2}));
  EXPECT_EQ(pool.lookup(H(9)), 1);
}

TEST(BlockPool, DuplicateHashKeepsFirstBlock) {
  BlockPool pool(4);
  std::vector<int32_t> a;
  pool.allocate(2, a);
  pool.register_block(a[0], H(7));
  pool.register_block(a[1], H(7));
  EXPECT_EQ(pool.lookup(H(7)), a[0]);
  EXPECT_FALSE(pool.is_registered(a[1]));
  // The unregistered duplicate holds nothing worth keeping: it is reused before the cached one.
  pool.release(a.data(), 2);
  EXPECT_EQ(allocate(pool, 1), (std::vector<int32_t>{a[1]}));
  EXPECT_EQ(pool.lookup(H(7)), a[0]);
}

TEST(BlockPool, ResetPrefixCacheOnlyWhenIdle) {
  BlockPool pool(3);
  std::vector<int32_t> a;
  pool.allocate(1, a);
  pool.register_block(a[0], H(5));
  EXPECT_FALSE(pool.reset_prefix_cache());
  pool.release(&a[0], 1);
  EXPECT_TRUE(pool.reset_prefix_cache());
  EXPECT_EQ(pool.lookup(H(5)), -1);
  EXPECT_FALSE(pool.is_registered(a[0]));
  EXPECT_EQ(pool.num_cached_blocks(), 0);
  EXPECT_EQ(pool.num_free_blocks(), 2);
  EXPECT_EQ(allocate(pool, 1), a);  // still reused before the fresh block
  EXPECT_EQ(pool.num_touched_blocks(), 1);
}

// A random load of requests: each takes 1-8 blocks (sometimes after a prefix hit) while at most
// kMaxInUse blocks are in use, registers some of them under 64 possible hashes, and a random held
// request is freed otherwise. check(pool, peak in use) runs after every step.
struct RandomLoad {
  static constexpr int32_t kPoolBlocks = 1001;
  static constexpr int32_t kMaxInUse = 40;
  int32_t peak_in_use = 0;
  int64_t hits = 0;
  int32_t touched_after_release = 0;

  template <typename Check>
  void run(BlockPool& pool, uint32_t seed, Check&& check) {
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int32_t> size(1, 8), coin(0, 3), hash_pick(0, 63);
    std::vector<std::vector<int32_t>> held;
    auto in_use = [&] { return kPoolBlocks - 1 - pool.num_free_blocks(); };
    for (int step = 0; step < 20000; ++step) {
      const int32_t n = size(rng);
      if (in_use() + n + 1 <= kMaxInUse && coin(rng) != 0) {  // +1: a prefix hit
        std::vector<int32_t> blocks;
        // Sometimes start with a cached block (a prefix hit), as the KV cache manager does.
        const int32_t cached = pool.lookup(H(hash_pick(rng)));
        if (cached >= 0 && coin(rng) != 0) {
          pool.touch(cached);
          blocks.push_back(cached);
          ++hits;
        }
        pool.allocate(n, blocks);
        for (int32_t b : blocks) {
          if (coin(rng) == 0) pool.register_block(b, H(hash_pick(rng)));
        }
        held.push_back(std::move(blocks));
      } else if (!held.empty()) {
        const size_t victim = std::uniform_int_distribution<size_t>(0, held.size() - 1)(rng);
        pool.release_reversed(held[victim]);
        held.erase(held.begin() + static_cast<std::ptrdiff_t>(victim));
      }
      peak_in_use = std::max(peak_in_use, in_use());
      check(pool, peak_in_use, step);
    }
    for (const auto& blocks : held) pool.release_reversed(blocks);
    EXPECT_EQ(pool.num_free_blocks(), kPoolBlocks - 1);
    touched_after_release = pool.num_touched_blocks();
  }
};

// Without cache headroom, a long run whose blocks in use never exceed a small working set
// touches exactly the peak working set, however large the pool (the old LRU-of-everything order
// touched it all).
TEST(BlockPool, BoundedWorkingSetKeepsTouchedBlocksAtThePeak) {
  BlockPool pool(RandomLoad::kPoolBlocks, /*cache_headroom=*/0.0);
  RandomLoad load;
  load.run(pool, 1234, [](const BlockPool& p, int32_t peak, int step) {
    // Blocks in use are touched, and a fresh block is only taken when every touched block is in
    // use, so the touched set is exactly the peak of blocks in use so far.
    ASSERT_EQ(p.num_touched_blocks(), peak) << "step " << step;
  });
  EXPECT_LE(load.peak_in_use, RandomLoad::kMaxInUse);
  EXPECT_GT(load.peak_in_use, RandomLoad::kMaxInUse / 2);
  EXPECT_GT(load.hits, 100);
  EXPECT_GT(pool.num_cached_blocks(), 0);
  EXPECT_EQ(load.touched_after_release, load.peak_in_use);
}

TEST(BlockPool, CachedBlocksGetHeadroomBesideThePeakWorkingSet) {
  BlockPool pool(20);                          // headroom 1: touched may reach 2 x peak in use
  std::vector<int32_t> a = allocate(pool, 4);  // 1 2 3 4, peak in use 4
  for (int32_t b : a) pool.register_block(b, H(10 + b));
  pool.release_reversed(a);  // cached, LRU first: 4 3 2 1
  // Fresh blocks rather than evicting while touched < 2 x 4.
  std::vector<int32_t> b = allocate(pool, 4);
  EXPECT_EQ(b, (std::vector<int32_t>{5, 6, 7, 8}));
  EXPECT_EQ(pool.num_cached_blocks(), 4);
  for (int32_t x : b) pool.register_block(x, H(10 + x));
  pool.release_reversed(b);  // cached: 4 3 2 1 8 7 6 5
  // Touched 8 = 2 x peak: now the least recently freed cached block goes.
  EXPECT_EQ(allocate(pool, 1), (std::vector<int32_t>{4}));
  EXPECT_EQ(pool.lookup(H(14)), -1);
  EXPECT_EQ(pool.lookup(H(11)), 1);
  EXPECT_EQ(pool.num_touched_blocks(), 8);
  // An uncached freed block still comes before everything else.
  const int32_t four = 4;
  pool.release(&four, 1);
  EXPECT_EQ(allocate(pool, 1), (std::vector<int32_t>{4}));
  EXPECT_EQ(pool.lookup(H(13)), 3);
}

// A floor of cached blocks beside the working set: a single stream of 4 blocks keeps the blocks
// of 3 earlier requests besides its own (12 cached) where the headroom alone kept 1.
TEST(BlockPool, MinCachedBlocksKeepPrefixesBesideASmallWorkingSet) {
  BlockPool pool(40, /*cache_headroom=*/1.0, /*min_cached_blocks=*/12);
  for (int32_t request = 0; request < 4; ++request) {
    std::vector<int32_t> blocks = allocate(pool, 4);
    for (int32_t i = 0; i < 4; ++i) pool.register_block(blocks[i], H(100 * request + i));
    pool.release_reversed(blocks);
  }
  EXPECT_EQ(pool.num_touched_blocks(), 16);  // 4 in use at a time + 12 cached
  EXPECT_EQ(pool.num_cached_blocks(), 16);
  // The next request evicts the oldest prefix only, tail first; three earlier ones stay.
  std::vector<int32_t> next = allocate(pool, 4);
  EXPECT_EQ(pool.num_touched_blocks(), 16);
  for (int32_t i = 0; i < 4; ++i) EXPECT_EQ(pool.lookup(H(i)), -1) << i;
  for (int32_t request = 1; request < 4; ++request)
    for (int32_t i = 0; i < 4; ++i) EXPECT_GE(pool.lookup(H(100 * request + i)), 1);
  // With the headroom alone (twice the 4 blocks in use), a fifth request would leave only the
  // fourth's blocks: after four, the first two requests' are gone already.
  BlockPool small(40);
  for (int32_t request = 0; request < 4; ++request) {
    std::vector<int32_t> blocks = allocate(small, 4);
    for (int32_t i = 0; i < 4; ++i) small.register_block(blocks[i], H(100 * request + i));
    small.release_reversed(blocks);
  }
  EXPECT_EQ(small.num_touched_blocks(), 8);
  EXPECT_EQ(small.lookup(H(0)), -1);
  EXPECT_EQ(small.lookup(H(100)), -1);
  EXPECT_GE(small.lookup(H(200)), 1);
  EXPECT_GE(small.lookup(H(300)), 1);
}

// The same load with the default headroom: the touched set stays within twice the peak working
// set, and the extra room keeps more prefixes (more hits than without it).
TEST(BlockPool, HeadroomBoundsTouchedBlocksAndKeepsMorePrefixes) {
  RandomLoad without, with;
  BlockPool pool0(RandomLoad::kPoolBlocks, 0.0), pool1(RandomLoad::kPoolBlocks);
  without.run(pool0, 99, [](const BlockPool&, int32_t, int) {});
  with.run(pool1, 99, [](const BlockPool& p, int32_t peak, int step) {
    ASSERT_LE(p.num_touched_blocks(), 2 * peak) << "step " << step;
  });
  EXPECT_EQ(without.touched_after_release, without.peak_in_use);
  EXPECT_GT(with.touched_after_release, with.peak_in_use);
  EXPECT_GT(with.hits, without.hits);
}
