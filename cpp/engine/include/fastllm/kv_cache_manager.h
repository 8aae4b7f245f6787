// KVCacheManager: maps requests to KV blocks. Owns the device BlockPool, the CPU swap pool, the
// prefix cache (chained block hashes) and copy-on-write forks. Engine-thread only.
//
// Block hashes chain: hash(block i) = H(hash(block i-1), cache_salt, tokens of block i), H being
// SHA-256 by default (see block_hash.h), so equal hashes mean equal whole prefixes. Full blocks of
// computed tokens are registered; so is the partial last block of a computed prompt, under a key
// of its first tokens (a prompt that ends mid-block), so a later request with the same prompt
// reuses all of it but its last token, as with whole blocks, instead of recomputing up to
// block_size - 1 tokens.
//
// A hit is never trusted on the hash alone (a collision would hand one request another's KV):
// each cached block keeps its tokens, its cache salt and its parent's node, a serial number given
// to each registration, so that a node names one exact token prefix. A hit must match all three
// (the parent being the block matched just before), otherwise it counts as a collision and a miss.
//
// Check-then-act: every can_X(...) is a pure check; the matching X(...) must only be called after
// it returned true, and the block operations it implies (copies, swaps) are queued in
// pending_ops() for the next BatchPlan.
#pragma once

#include <cstdint>
#include <vector>

#include "fastllm/block_pool.h"
#include "fastllm/request.h"

namespace fastllm {

struct KVCacheConfig {
  int32_t num_gpu_blocks = 0;  // device blocks including the null block 0
  int32_t num_cpu_blocks = 0;  // swap-space blocks (block 0 of the swap space is unused)
  int32_t block_size = 16;     // tokens per block: 8, 16 or 32
  bool enable_prefix_caching = true;
  // Device blocks the prefix cache may keep beside the peak working set whatever the headroom
  // (BlockPool): the whole pool where the KV memory is allocated up front anyway (a GPU), a
  // memory budget where blocks become resident as they are first used (the CPU).
  int32_t min_cached_blocks = 0;
  // Digest that keys the prefix cache: SHA-256 (collision-resistant), or a keyed 128-bit SipHash
  // (faster, per-process key). kTestWeak is for tests only.
  PrefixHashAlgo hash_algo = PrefixHashAlgo::kSha256;
};

// A prefix-cache hit for a request that holds no blocks yet: whole blocks, then possibly the
// first tokens of a partial block (the tail of an earlier prompt), which the request gets a copy
// of (the source keeps its cached content).
struct CachedPrefix {
  std::vector<int32_t> blocks;
  int32_t partial_block = -1;
  int32_t partial_tokens = 0;
  int32_t num_tokens = 0;  // blocks.size() * block_size + partial_tokens
};

// Block operations the executor applies before the forward pass, in this order:
// swap_out (device -> host), swap_in (host -> device), copy (device -> device). Each is a
// flat list of (src, dst) pairs.
struct BlockOps {
  std::vector<int32_t> swap_out;
  std::vector<int32_t> swap_in;
  std::vector<int32_t> copy;
  bool empty() const { return swap_out.empty() && swap_in.empty() && copy.empty(); }
  void clear() {
    swap_out.clear();
    swap_in.clear();
    copy.clear();
  }
};

class KVCacheManager {
 public:
  explicit KVCacheManager(const KVCacheConfig& config);

  const KVCacheConfig& config() const { return config_; }
  int32_t block_size() const { return config_.block_size; }
  const BlockPool& device_pool() const { return device_; }
  const BlockPool& swap_pool() const { return swap_; }

  // Longest cached prefix of req: full blocks, then the longest cached partial block after them,
  // capped so that at least one token is left to compute. Empty when prefix caching is off or
  // the request wants prompt logprobs.
  CachedPrefix find_cached_prefix(Request& req);

  // Blocks that allocate_slots would take from the free list (including blocks of `prefix` that
  // are currently unreferenced, and a copy-on-write replacement of a shared partial last block).
  int32_t num_blocks_needed(const Request& req, int32_t num_new_tokens,
                            const CachedPrefix* prefix = nullptr) const;
  bool can_allocate_slots(const Request& req, int32_t num_new_tokens,
                          const CachedPrefix* prefix = nullptr) const;
  // Extends req's block table to hold num_new_tokens more tokens. With a prefix, the request
  // must hold no blocks; it takes the prefix blocks and its num_computed_tokens becomes the
  // prefix length, and the lookup is counted in the hit-rate counters.
  void allocate_slots(Request& req, int32_t num_new_tokens, const CachedPrefix* prefix = nullptr);

  // Registers the request's full, computed blocks in the prefix cache, and its prompt's partial
  // last block once the prompt is computed (no-op when caching is off).
  void cache_full_blocks(Request& req);

  // Releases every device and swap block the request holds (tail first).
  void free(Request& req);
  // Releases the device blocks past those that hold its first num_tokens positions: slots taken
  // for draft tokens that the target rejected (they were never registered or shared).
  void free_tail(Request& req, int32_t num_tokens);

  // child takes a reference on every block of parent; the first write into a shared partial block
  // copies it (copy-on-write). child must hold no blocks and have parent's computed tokens.
  void fork(const Request& parent, Request& child);

  bool can_swap_out(const Request& req) const;
  void swap_out(Request& req);
  bool can_swap_in(const Request& req, int32_t num_new_tokens) const;
  // Brings the request's blocks back to the device and makes room for num_new_tokens more.
  void swap_in(Request& req, int32_t num_new_tokens);

  BlockOps& pending_ops() { return pending_; }
  // Called once before each schedule: returns host blocks whose swap-in has been executed.
  void begin_step();

  // Prefix-cache counters in tokens, since construction.
  int64_t prefix_queries() const { return prefix_queries_; }
  int64_t prefix_hits() const { return prefix_hits_; }
  // Lookups whose hash matched a cached block holding other tokens (rejected as misses).
  int64_t prefix_hash_collisions() const { return prefix_hash_collisions_; }
  bool reset_prefix_cache() { return device_.reset_prefix_cache(); }

 private:
  // What a cached block was registered with, so that a hit can be checked exactly.
  struct CachedKey {
    uint64_t node = 0;         // this registration's serial (full blocks); 0 names no prefix
    uint64_t parent_node = 0;  // the preceding block's node; 0 for the first block
    uint64_t salt = 0;
    int32_t num_tokens = 0;
  };

  void ensure_block_hashes(Request& req, int32_t num_full_blocks) const;
  bool needs_copy_on_write(const Request& req) const;
  void cache_prompt_tail(Request& req);
  // Whether key (with tokens stored at stored) describes exactly these tokens after parent_node.
  bool key_matches(const CachedKey& key, const int32_t* stored, uint64_t parent_node, uint64_t salt,
                   const int32_t* tokens, int32_t n) const;
  void store_key(bool partial, int32_t block, uint64_t node, uint64_t parent_node, uint64_t salt,
                 const int32_t* tokens, int32_t n);

  KVCacheConfig config_;
  BlockPool device_;
  BlockPool swap_;
  BlockOps pending_;
  std::vector<int32_t> scratch_;
  std::vector<int32_t> released_swap_blocks_;
  std::vector<int32_t> copied_partial_sources_;  // held until the copy has been executed
  int64_t prefix_queries_ = 0;
  int64_t prefix_hits_ = 0;
  int64_t prefix_hash_collisions_ = 0;
  mutable BlockHasher hasher_;
  // Per device block: the key of its full-block registration and of its partial one, and their
  // tokens (block_size per block). Valid while the pool indexes the block under that kind.
  std::vector<CachedKey> full_keys_;
  std::vector<CachedKey> partial_keys_;
  std::vector<int32_t> full_tokens_;
  std::vector<int32_t> partial_tokens_;
  uint64_t next_node_ = 1;
};

}  // namespace fastllm
