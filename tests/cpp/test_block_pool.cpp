#include <gtest/gtest.h>

#include "fastllm/block_pool.h"
#include "fastllm/errors.h"

using fastllm::BlockPool;

TEST(BlockPool, NullBlockIsNeverHandedOut) {
  BlockPool pool(4);
  EXPECT_EQ(pool.num_free_blocks(), 3);
  std::vector<int32_t> got;
  pool.allocate(3, got);
  EXPECT_EQ(got, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_FALSE(pool.can_allocate(1));
  EXPECT_THROW(pool.allocate(1, got), fastllm::EngineError);
  EXPECT_DOUBLE_EQ(pool.usage(), 1.0);
}

TEST(BlockPool, FreedBlocksAreReusedInLruOrder) {
  BlockPool pool(5);
  std::vector<int32_t> a;
  pool.allocate(4, a);     // 1 2 3 4
  pool.release(&a[2], 1);  // 3 freed first
  pool.release(&a[0], 1);  // then 1
  std::vector<int32_t> b;
  pool.allocate(2, b);
  EXPECT_EQ(b, (std::vector<int32_t>{3, 1}));
}

TEST(BlockPool, ReleaseReversedFreesTailFirst) {
  BlockPool pool(4);
  std::vector<int32_t> a;
  pool.allocate(3, a);
  pool.release_reversed(a);
  std::vector<int32_t> b;
  pool.allocate(3, b);
  EXPECT_EQ(b, (std::vector<int32_t>{3, 2, 1}));
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
}

TEST(BlockPool, CachedBlocksSurviveFreeAndAreEvictedLazily) {
  BlockPool pool(4);
  std::vector<int32_t> a;
  pool.allocate(2, a);  // 1 2
  pool.register_block(a[0], 111);
  pool.register_block(a[1], 222);
  pool.release_reversed(a);  // free list: 3, 2, 1
  EXPECT_EQ(pool.lookup(111), 1);
  EXPECT_EQ(pool.lookup(222), 2);
  // Taking a cached block back removes it from the free list without evicting anything.
  pool.touch(1);
  EXPECT_EQ(pool.num_free_blocks(), 2);
  EXPECT_EQ(pool.lookup(111), 1);
  // Allocation takes 3 (never cached) and then 2, evicting hash 222 only now.
  std::vector<int32_t> b;
  pool.allocate(1, b);
  EXPECT_EQ(b[0], 3);
  EXPECT_EQ(pool.lookup(222), 2);
  pool.allocate(1, b);
  EXPECT_EQ(b[1], 2);
  EXPECT_EQ(pool.lookup(222), -1);
  EXPECT_EQ(pool.lookup(111), 1);
}

TEST(BlockPool, DuplicateHashKeepsFirstBlock) {
  BlockPool pool(4);
  std::vector<int32_t> a;
  pool.allocate(2, a);
  pool.register_block(a[0], 7);
  pool.register_block(a[1], 7);
  EXPECT_EQ(pool.lookup(7), a[0]);
  EXPECT_FALSE(pool.is_registered(a[1]));
}

TEST(BlockPool, ResetPrefixCacheOnlyWhenIdle) {
  BlockPool pool(3);
  std::vector<int32_t> a;
  pool.allocate(1, a);
  pool.register_block(a[0], 5);
  EXPECT_FALSE(pool.reset_prefix_cache());
  pool.release(&a[0], 1);
  EXPECT_TRUE(pool.reset_prefix_cache());
  EXPECT_EQ(pool.lookup(5), -1);
}
