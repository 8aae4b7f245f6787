// BlockPool: the fixed set of KV-cache block indices, their reference counts, the free list and
// the prefix-cache index. It hands out indices only; the executor owns the memory behind them.
// Engine-thread only.
//
// Block 0 is the null block: never allocated, used to pad block tables.
//
// Free list (doubly linked, O(1) removal), evicted from the head:
//
//   head -> [least recently freed] <-> ... <-> [most recently freed] <- tail
//
// A block whose ref count drops to 0 is appended at the tail but keeps its hash, so a later request
// with the same prefix can take it back (a "cached" free block). Allocation pops the head and only
// then drops the block's hash from the index: eviction is lazy and in LRU order. Callers free a
// request's blocks tail-first, so the end of a sequence is evicted before its shared prefix.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

namespace fastllm {

class BlockPool {
 public:
  static constexpr int32_t kNullBlock = 0;

  // num_blocks includes the null block, so num_blocks - 1 are usable.
  explicit BlockPool(int32_t num_blocks);

  int32_t num_blocks() const { return static_cast<int32_t>(blocks_.size()); }
  // Blocks that can be handed out now: unreferenced ones, cached or not.
  int32_t num_free_blocks() const { return num_free_; }
  // Fraction of usable blocks referenced by requests.
  double usage() const;

  bool can_allocate(int32_t n) const { return n <= num_free_; }
  // Pops n blocks from the LRU head (evicting their cached hashes); each gets ref count 1.
  // Precondition: can_allocate(n).
  void allocate(int32_t n, std::vector<int32_t>& out);

  // Takes a reference on a block found in the prefix cache, removing it from the free list if it
  // was unreferenced.
  void touch(int32_t block);
  // Drops one reference from each block, in the order given; blocks reaching 0 join the tail.
  void release(const int32_t* blocks, int32_t n);
  void release_reversed(const std::vector<int32_t>& blocks);

  int32_t ref_count(int32_t block) const { return blocks_[block].ref_count; }

  // Prefix-cache index: hash -> block holding those tokens.
  // Returns the cached block for hash, or -1.
  int32_t lookup(uint64_t hash) const;
  // Records that block holds the full block described by hash. A hash already present keeps its
  // first block (two requests may have computed the same prefix in one step).
  void register_block(int32_t block, uint64_t hash);
  bool is_registered(int32_t block) const { return blocks_[block].has_hash; }
  // Forgets every cached hash of unreferenced blocks. Returns false if some block is in use.
  bool reset_prefix_cache();
  int32_t num_cached_blocks() const { return static_cast<int32_t>(index_.size()); }

 private:
  struct Block {
    int32_t ref_count = 0;
    int32_t prev = -1;  // free-list links, -1 when not in the list
    int32_t next = -1;
    bool in_free_list = false;
    bool has_hash = false;
    uint64_t hash = 0;
  };

  void push_free_tail(int32_t block);
  void unlink_free(int32_t block);
  void drop_hash(int32_t block);

  std::vector<Block> blocks_;
  std::unordered_map<uint64_t, int32_t> index_;
  int32_t head_ = -1;
  int32_t tail_ = -1;
  int32_t num_free_ = 0;
};

}  // namespace fastllm
