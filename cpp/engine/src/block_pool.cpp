#include "fastllm/block_pool.h"

#include <string>

#include "fastllm/errors.h"

namespace fastllm {

BlockPool::BlockPool(int32_t num_blocks) : blocks_(num_blocks > 0 ? num_blocks : 0) {
  // Block 0 is the null block: permanently referenced, never in the free list.
  if (!blocks_.empty()) blocks_[kNullBlock].ref_count = 1;
  for (int32_t b = 1; b < num_blocks; ++b) push_free_tail(b);
}

double BlockPool::usage() const {
  const int32_t usable = num_blocks() - 1;
  if (usable <= 0) return 0.0;
  return static_cast<double>(usable - num_free_) / usable;
}

void BlockPool::push_free_tail(int32_t block) {
  Block& b = blocks_[block];
  b.prev = tail_;
  b.next = -1;
  b.in_free_list = true;
  if (tail_ >= 0) {
    blocks_[tail_].next = block;
  } else {
    head_ = block;
  }
  tail_ = block;
  ++num_free_;
}

void BlockPool::unlink_free(int32_t block) {
  Block& b = blocks_[block];
  if (b.prev >= 0) {
    blocks_[b.prev].next = b.next;
  } else {
    head_ = b.next;
  }
  if (b.next >= 0) {
    blocks_[b.next].prev = b.prev;
  } else {
    tail_ = b.prev;
  }
  b.prev = b.next = -1;
  b.in_free_list = false;
  --num_free_;
}

void BlockPool::drop_hash(int32_t block) {
  Block& b = blocks_[block];
  if (!b.has_hash) return;
  auto it = index_.find(b.hash);
  if (it != index_.end() && it->second == block) index_.erase(it);
  b.has_hash = false;
}

void BlockPool::allocate(int32_t n, std::vector<int32_t>& out) {
  if (n > num_free_) {
    throw EngineError("BlockPool::allocate: " + std::to_string(n) + " blocks asked, " +
                      std::to_string(num_free_) + " free");
  }
  for (int32_t i = 0; i < n; ++i) {
    const int32_t block = head_;
    unlink_free(block);
    drop_hash(block);  // lazy eviction: the cached content is overwritten from now on
    blocks_[block].ref_count = 1;
    out.push_back(block);
  }
}

void BlockPool::touch(int32_t block) {
  Block& b = blocks_[block];
  if (b.in_free_list) unlink_free(block);
  ++b.ref_count;
}

void BlockPool::release(const int32_t* blocks, int32_t n) {
  for (int32_t i = 0; i < n; ++i) {
    const int32_t block = blocks[i];
    Block& b = blocks_[block];
    if (block == kNullBlock || b.ref_count <= 0) {
      throw EngineError("BlockPool::release: block " + std::to_string(block) +
                        " is not referenced");
    }
    if (--b.ref_count == 0) push_free_tail(block);
  }
}

void BlockPool::release_reversed(const std::vector<int32_t>& blocks) {
  for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) release(&*it, 1);
}

int32_t BlockPool::lookup(uint64_t hash) const {
  auto it = index_.find(hash);
  return it == index_.end() ? -1 : it->second;
}

void BlockPool::register_block(int32_t block, uint64_t hash) {
  Block& b = blocks_[block];
  if (b.has_hash) return;
  if (!index_.emplace(hash, block).second) return;
  b.has_hash = true;
  b.hash = hash;
}

bool BlockPool::reset_prefix_cache() {
  if (num_free_ != num_blocks() - 1) return false;
  for (Block& b : blocks_) b.has_hash = false;
  index_.clear();
  return true;
}

}  // namespace fastllm
