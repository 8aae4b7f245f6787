#include "fastllm/block_pool.h"

#include <string>

#include "fastllm/errors.h"

namespace fastllm {

BlockPool::BlockPool(int32_t num_blocks, double cache_headroom, int32_t min_cached_blocks)
    : blocks_(num_blocks > 0 ? num_blocks : 0),
      cache_headroom_(std::max(0.0, cache_headroom)),
      min_cached_blocks_(std::max(0, min_cached_blocks)) {
  // Block 0 is the null block: permanently referenced, never in the free list. Every other block
  // starts fresh, outside the free list, so its memory stays untouched until it is needed.
  if (!blocks_.empty()) blocks_[kNullBlock].ref_count = 1;
  num_free_ = num_blocks > 1 ? num_blocks - 1 : 0;
}

double BlockPool::usage() const {
  const int32_t usable = num_blocks() - 1;
  if (usable <= 0) return 0.0;
  return static_cast<double>(usable - num_free_) / usable;
}

void BlockPool::push_free_head(int32_t block) {
  Block& b = blocks_[block];
  b.prev = -1;
  b.next = head_;
  b.in_free_list = true;
  if (head_ >= 0) {
    blocks_[head_].prev = block;
  } else {
    tail_ = block;
  }
  head_ = block;
  ++num_free_;
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
  if (b.has_hash) {
    auto it = index_.find(b.hash);
    if (it != index_.end() && it->second == block) index_.erase(it);
    b.has_hash = false;
  }
  if (b.has_partial) {
    auto it = partial_index_.find(b.partial_key);
    if (it != partial_index_.end() && it->second == block) partial_index_.erase(it);
    b.has_partial = false;
  }
}

void BlockPool::allocate(int32_t n, std::vector<int32_t>& out) {
  if (n > num_free_) {
    throw EngineError("BlockPool::allocate: " + std::to_string(n) + " blocks asked, " +
                      std::to_string(num_free_) + " free");
  }
  for (int32_t i = 0; i < n; ++i) {
    const bool fresh_left = next_fresh_ < num_blocks();
    bool take_head = head_ >= 0;
    if (take_head && blocks_[head_].cached() && fresh_left) {
      // Only cached blocks are free: keep them while the cache has headroom.
      const int32_t peak = std::max(peak_in_use_, num_in_use() + 1);
      const double limit =
          std::max((1.0 + cache_headroom_) * peak, static_cast<double>(peak) + min_cached_blocks_);
      take_head = num_touched_blocks() >= limit;
    }
    int32_t block;
    if (take_head) {
      block = head_;
      unlink_free(block);
      drop_hash(block);  // lazy eviction: the cached content is overwritten from now on
    } else {
      block = next_fresh_++;
      --num_free_;
    }
    blocks_[block].ref_count = 1;
    out.push_back(block);
    note_in_use();
  }
}

void BlockPool::touch(int32_t block) {
  if (is_fresh(block)) {
    throw EngineError("BlockPool::touch: block " + std::to_string(block) + " was never allocated");
  }
  Block& b = blocks_[block];
  if (b.in_free_list) unlink_free(block);
  ++b.ref_count;
  note_in_use();
}

void BlockPool::release(const int32_t* blocks, int32_t n, bool evict_first) {
  for (int32_t i = 0; i < n; ++i) {
    const int32_t block = blocks[i];
    Block& b = blocks_[block];
    if (block == kNullBlock || b.ref_count <= 0) {
      throw EngineError("BlockPool::release: block " + std::to_string(block) +
                        " is not referenced");
    }
    if (--b.ref_count > 0) continue;
    // Cached blocks wait at the tail in LRU order; an uncached one is reused first.
    if (b.cached() && !evict_first) {
      push_free_tail(block);
    } else {
      push_free_head(block);
    }
  }
}

void BlockPool::release_reversed(const std::vector<int32_t>& blocks) {
  for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) release(&*it, 1);
}

int32_t BlockPool::lookup(const BlockHash& hash) const {
  auto it = index_.find(hash);
  return it == index_.end() ? -1 : it->second;
}

bool BlockPool::register_key(int32_t block, const BlockHash& key, bool partial) {
  if (is_fresh(block)) {
    throw EngineError("BlockPool::register: block " + std::to_string(block) +
                      " was never allocated");
  }
  Block& b = blocks_[block];
  bool& has = partial ? b.has_partial : b.has_hash;
  if (has) return false;
  if (!(partial ? partial_index_ : index_).emplace(key, block).second) return false;
  const bool was_cached = b.cached();
  has = true;
  (partial ? b.partial_key : b.hash) = key;
  // An unreferenced block now holds a cached prefix: move it among the cached blocks.
  if (b.in_free_list && !was_cached) {
    unlink_free(block);
    push_free_tail(block);
  }
  return true;
}

bool BlockPool::register_block(int32_t block, const BlockHash& hash) {
  return register_key(block, hash, false);
}

int32_t BlockPool::lookup_partial(const BlockHash& key) const {
  auto it = partial_index_.find(key);
  return it == partial_index_.end() ? -1 : it->second;
}

bool BlockPool::register_partial(int32_t block, const BlockHash& key) {
  return register_key(block, key, true);
}

bool BlockPool::reset_prefix_cache() {
  if (num_free_ != num_blocks() - 1) return false;
  for (Block& b : blocks_) b.has_hash = b.has_partial = false;
  index_.clear();
  partial_index_.clear();
  return true;
}

}  // namespace fastllm
