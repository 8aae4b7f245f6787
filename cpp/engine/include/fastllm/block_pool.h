// BlockPool: the fixed set of KV-cache block indices, their reference counts, the free list and
// the prefix-cache index. It hands out indices only; the executor owns the memory behind them.
// Engine-thread only.
//
// Block 0 is the null block: never allocated, used to pad block tables.
//
// The executor's memory is mapped lazily, so only blocks that were ever handed out are resident.
// Allocation therefore reuses freed blocks before it touches new ones, and the resident set
// follows the peak working set instead of growing to the whole pool:
//
//   [0: null] [1 .. next_fresh_-1: touched] [next_fresh_ .. num_blocks-1: fresh, never handed out]
//
// Fresh blocks are a range, not list entries. The free list (doubly linked, O(1) removal) holds
// only touched blocks with ref count 0:
//
//   head -> [uncached, most recently freed] <-> ... <-> [cached, least recently freed]
//                                           <-> ... <-> [cached, most recently freed] <- tail
//
// A released block without a cached hash joins the head: it holds nothing worth keeping and its
// memory is warm. A released block with a hash joins the tail and keeps its hash, so a later
// request with the same prefix can take it back (touch). Allocation order:
//   1. an uncached free block (the head), most recently freed first;
//   2. a fresh block, while the touched blocks number less than (1 + cache_headroom) x the peak
//      of blocks in use so far, or that peak + min_cached_blocks if more: cached prefixes get
//      that much room beside the working set (the floor matters when the working set is small:
//      one stream's blocks, which would otherwise leave room for its own prefix only);
//   3. the least recently freed cached block (the head once no uncached one is left), whose hash
//      is dropped only now, so cached blocks are evicted lazily in LRU order;
//   4. a fresh block (the pool is larger than the headroom allows, but nothing else is free).
// Fresh blocks go out in increasing index order. Callers free a request's blocks tail-first, so
// the end of a sequence is evicted before its shared prefix. Resident memory thus stays within
// max((1 + cache_headroom) x the peak working set, the peak + min_cached_blocks) unless the pool
// has nothing else to give.
#pragma once

#include <algorithm>
#include <cstdint>
#include <unordered_map>
#include <vector>

#include "fastllm/block_hash.h"

namespace fastllm {

class BlockPool {
 public:
  static constexpr int32_t kNullBlock = 0;

  // num_blocks includes the null block, so num_blocks - 1 are usable. cache_headroom and
  // min_cached_blocks: see above (both 0 evict a cached block before touching a fresh one).
  explicit BlockPool(int32_t num_blocks, double cache_headroom = 1.0,
                     int32_t min_cached_blocks = 0);

  int32_t num_blocks() const { return static_cast<int32_t>(blocks_.size()); }
  // Blocks that can be handed out now: unreferenced ones, cached or not, and fresh ones.
  int32_t num_free_blocks() const { return num_free_; }
  // Blocks ever handed out (the null block excluded): the resident working set.
  int32_t num_touched_blocks() const { return next_fresh_ - 1; }
  // Fraction of usable blocks referenced by requests.
  double usage() const;

  bool can_allocate(int32_t n) const { return n <= num_free_; }
  // Takes n blocks in the order above, each with ref count 1. Precondition: can_allocate(n).
  void allocate(int32_t n, std::vector<int32_t>& out);

  // Takes a reference on a block found in the prefix cache (or already referenced), removing it
  // from the free list if it was unreferenced. Throws for a block never handed out.
  void touch(int32_t block);
  // Drops one reference from each block, in the order given; a block reaching 0 joins the tail if
  // it is cached, the head otherwise.
  // evict_first: cached blocks that reach 0 go to the head with the uncached ones (reused, and
  // so evicted, before the LRU part), for content less likely to be asked for again.
  void release(const int32_t* blocks, int32_t n, bool evict_first = false);
  void release_reversed(const std::vector<int32_t>& blocks);

  int32_t ref_count(int32_t block) const { return blocks_[block].ref_count; }

  // Prefix-cache index: hash -> block holding those tokens.
  // Returns the cached block for hash, or -1. The index trusts the hash alone: callers verify
  // that the block really holds their tokens (KVCacheManager).
  int32_t lookup(const BlockHash& hash) const;
  // Records that block holds the full block described by hash. A hash already present keeps its
  // first block (two requests may have computed the same prefix in one step). Returns whether
  // block is now indexed under hash by this call. Throws for a block never handed out.
  bool register_block(int32_t block, const BlockHash& hash);
  bool is_registered(int32_t block) const { return blocks_[block].has_hash; }
  // A second index for partial blocks: key -> block whose first tokens match the key (the tail
  // of a prompt that ended inside the block). A block may carry one of each; eviction drops both.
  int32_t lookup_partial(const BlockHash& key) const;
  bool register_partial(int32_t block, const BlockHash& key);
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
    BlockHash hash;
    bool has_partial = false;
    BlockHash partial_key;
    bool cached() const { return has_hash || has_partial; }
  };

  bool is_fresh(int32_t block) const { return block >= next_fresh_; }
  int32_t num_in_use() const { return num_blocks() - 1 - num_free_; }
  void note_in_use() { peak_in_use_ = std::max(peak_in_use_, num_in_use()); }
  void push_free_head(int32_t block);
  void push_free_tail(int32_t block);
  void unlink_free(int32_t block);
  void drop_hash(int32_t block);
  bool register_key(int32_t block, const BlockHash& key, bool partial);

  std::vector<Block> blocks_;
  std::unordered_map<BlockHash, int32_t> index_;
  std::unordered_map<BlockHash, int32_t> partial_index_;
  int32_t head_ = -1;
  int32_t tail_ = -1;
  int32_t next_fresh_ = 1;  // blocks [next_fresh_, num_blocks) were never handed out
  int32_t num_free_ = 0;    // free-list length + fresh blocks
  double cache_headroom_ = 1.0;
  int32_t min_cached_blocks_ = 0;
  int32_t peak_in_use_ = 0;
};

}  // namespace fastllm
