#include "fastllm/kv_cache_manager.h"

#include <algorithm>
#include <string>

#include "fastllm/errors.h"

namespace fastllm {

namespace {

int32_t ceil_div(int32_t a, int32_t b) { return (a + b - 1) / b; }

}  // namespace

KVCacheManager::KVCacheManager(const KVCacheConfig& config)
    : config_(config),
      device_(config.num_gpu_blocks, /*cache_headroom=*/1.0, config.min_cached_blocks),
      swap_(config.num_cpu_blocks),
      hasher_(config.hash_algo) {
  const int32_t bs = config.block_size;
  if (bs != 8 && bs != 16 && bs != 32) {
    throw ConfigError("block_size must be 8, 16 or 32, got " + std::to_string(bs));
  }
  if (config.num_gpu_blocks < 2) {
    throw ConfigError("num_gpu_blocks must be at least 2 (block 0 is reserved), got " +
                      std::to_string(config.num_gpu_blocks));
  }
  if (config.num_cpu_blocks < 0) {
    throw ConfigError("num_cpu_blocks must be non-negative");
  }
  if (config.enable_prefix_caching) {
    const size_t n = static_cast<size_t>(config.num_gpu_blocks);
    full_keys_.resize(n);
    partial_keys_.resize(n);
    full_tokens_.resize(n * bs);
    partial_tokens_.resize(n * bs);
  }
}

bool KVCacheManager::key_matches(const CachedKey& key, const int32_t* stored, uint64_t parent_node,
                                 uint64_t salt, const int32_t* tokens, int32_t n) const {
  return key.parent_node == parent_node && key.salt == salt && key.num_tokens == n &&
         std::equal(tokens, tokens + n, stored);
}

void KVCacheManager::store_key(bool partial, int32_t block, uint64_t node, uint64_t parent_node,
                               uint64_t salt, const int32_t* tokens, int32_t n) {
  CachedKey& key = (partial ? partial_keys_ : full_keys_)[block];
  key.node = node;
  key.parent_node = parent_node;
  key.salt = salt;
  key.num_tokens = n;
  std::copy(tokens, tokens + n,
            (partial ? partial_tokens_ : full_tokens_).begin() +
                static_cast<size_t>(block) * config_.block_size);
}

void KVCacheManager::ensure_block_hashes(Request& req, int32_t num_full_blocks) const {
  const int32_t bs = config_.block_size;
  auto& hashes = req.block_hashes;
  while (static_cast<int32_t>(hashes.size()) < num_full_blocks) {
    const int32_t i = static_cast<int32_t>(hashes.size());
    hashes.push_back(hasher_.hash(i == 0 ? BlockHash{} : hashes[i - 1], req.cache_salt,
                                  /*partial=*/false, req.token_ids.data() + i * bs, bs));
  }
}

CachedPrefix KVCacheManager::find_cached_prefix(Request& req) {
  CachedPrefix prefix;
  // Prompt logprobs need the logits of every prompt position, so such requests compute them all.
  if (!config_.enable_prefix_caching || req.params.prompt_logprobs >= 0) return prefix;
  const int32_t bs = config_.block_size;
  const int32_t max_blocks = (req.num_tokens() - 1) / bs;  // leave at least one token to compute
  ensure_block_hashes(req, max_blocks);
  const int32_t* tokens = req.token_ids.data();
  uint64_t parent_node = 0;
  for (int32_t i = 0; i < max_blocks; ++i) {
    const int32_t block = device_.lookup(req.block_hashes[i]);
    if (block < 0) break;
    const CachedKey& key = full_keys_[block];
    if (!key_matches(key, &full_tokens_[static_cast<size_t>(block) * bs], parent_node,
                     req.cache_salt, tokens + i * bs, bs)) {
      ++prefix_hash_collisions_;
      break;
    }
    parent_node = key.node;
    prefix.blocks.push_back(block);
  }
  const int32_t full = static_cast<int32_t>(prefix.blocks.size());
  // Then the longest partial block keyed by its first n tokens (one hash fed token by token);
  // all but the request's last token are usable.
  const int32_t rest = req.num_tokens() - full * bs;
  const int32_t* tail = tokens + full * bs;
  if (rest > 1) {
    hasher_.begin(full == 0 ? BlockHash{} : req.block_hashes[full - 1], req.cache_salt,
                  /*partial=*/true);
  }
  for (int32_t n = 1; rest > 1 && n <= std::min(rest, bs - 1); ++n) {
    hasher_.add(tail + n - 1, 1);
    const int32_t block = device_.lookup_partial(hasher_.digest());
    if (block < 0) continue;
    if (!key_matches(partial_keys_[block], &partial_tokens_[static_cast<size_t>(block) * bs],
                     parent_node, req.cache_salt, tail, n)) {
      ++prefix_hash_collisions_;
      continue;
    }
    prefix.partial_block = block;
    prefix.partial_tokens = std::min(n, rest - 1);
  }
  // A prompt that ends on a block boundary, every block but its last found above (rest == bs
  // says both): the last can be cached whole, but the full blocks stop one short (a token must
  // be left to compute). A copy of it serves all but that token instead of the whole block
  // being computed again.
  if (prefix.partial_block < 0 && rest == bs) {
    ensure_block_hashes(req, full + 1);
    const int32_t block = device_.lookup(req.block_hashes[full]);
    if (block >= 0) {
      if (key_matches(full_keys_[block], &full_tokens_[static_cast<size_t>(block) * bs],
                      parent_node, req.cache_salt, tail, bs)) {
        prefix.partial_block = block;
        prefix.partial_tokens = bs - 1;
      } else {
        ++prefix_hash_collisions_;
      }
    }
  }
  prefix.num_tokens = full * bs + prefix.partial_tokens;
  return prefix;
}

bool KVCacheManager::needs_copy_on_write(const Request& req) const {
  const int32_t bs = config_.block_size;
  if (req.num_computed_tokens % bs == 0) return false;
  const int32_t idx = req.num_computed_tokens / bs;
  return idx < static_cast<int32_t>(req.block_ids.size()) &&
         device_.ref_count(req.block_ids[idx]) > 1;
}

int32_t KVCacheManager::num_blocks_needed(const Request& req, int32_t num_new_tokens,
                                          const CachedPrefix* prefix) const {
  int32_t held = static_cast<int32_t>(req.block_ids.size());
  int32_t computed = req.num_computed_tokens;
  int32_t needed = 0;
  if (prefix != nullptr) {
    held += static_cast<int32_t>(prefix->blocks.size());
    computed += prefix->num_tokens;
    for (int32_t b : prefix->blocks) {
      if (device_.ref_count(b) == 0) ++needed;  // taking it back removes it from the free list
    }
    // The copied partial block is held until the copy ran.
    if (prefix->partial_block >= 0 && device_.ref_count(prefix->partial_block) == 0) ++needed;
  }
  needed += std::max(0, ceil_div(computed + num_new_tokens, config_.block_size) - held);
  if (needs_copy_on_write(req)) ++needed;
  return needed;
}

bool KVCacheManager::can_allocate_slots(const Request& req, int32_t num_new_tokens,
                                        const CachedPrefix* prefix) const {
  return device_.can_allocate(num_blocks_needed(req, num_new_tokens, prefix));
}

void KVCacheManager::allocate_slots(Request& req, int32_t num_new_tokens,
                                    const CachedPrefix* prefix) {
  if (!can_allocate_slots(req, num_new_tokens, prefix)) {
    throw EngineError("allocate_slots called without room for request " + req.id);
  }
  const int32_t bs = config_.block_size;
  if (prefix != nullptr && config_.enable_prefix_caching) {
    // Counted at admission only, so a request retried over several steps counts once.
    prefix_queries_ += req.num_tokens();
    prefix_hits_ += prefix->num_tokens;
  }
  if (prefix != nullptr && prefix->num_tokens > 0) {
    if (!req.block_ids.empty()) {
      throw EngineError("allocate_slots: a cached prefix for request " + req.id +
                        " that already holds blocks");
    }
    req.block_nodes.clear();
    for (int32_t b : prefix->blocks) {
      device_.touch(b);
      req.block_nodes.push_back(full_keys_[b].node);
    }
    req.block_ids = prefix->blocks;
    req.num_registered_blocks = static_cast<int32_t>(prefix->blocks.size());
    if (prefix->partial_block >= 0) {
      // The request writes its own tokens after the shared ones: it gets a copy, and the source
      // stays referenced until the step that copies it has run (begin_step releases it).
      device_.touch(prefix->partial_block);
      copied_partial_sources_.push_back(prefix->partial_block);
      scratch_.clear();
      device_.allocate(1, scratch_);
      pending_.copy.push_back(prefix->partial_block);
      pending_.copy.push_back(scratch_[0]);
      req.block_ids.push_back(scratch_[0]);
    }
    req.num_computed_tokens = prefix->num_tokens;
  }
  if (needs_copy_on_write(req)) {
    const int32_t idx = req.num_computed_tokens / bs;
    const int32_t shared = req.block_ids[idx];
    scratch_.clear();
    device_.allocate(1, scratch_);
    pending_.copy.push_back(shared);
    pending_.copy.push_back(scratch_[0]);
    device_.release(&shared, 1);
    req.block_ids[idx] = scratch_[0];
  }
  const int32_t total = ceil_div(req.num_computed_tokens + num_new_tokens, bs);
  const int32_t extra = total - static_cast<int32_t>(req.block_ids.size());
  if (extra > 0) device_.allocate(extra, req.block_ids);
}

void KVCacheManager::cache_full_blocks(Request& req) {
  if (!config_.enable_prefix_caching) return;
  const int32_t bs = config_.block_size;
  const int32_t full =
      std::min(req.num_computed_tokens / bs, static_cast<int32_t>(req.block_ids.size()));
  if (full > req.num_registered_blocks) {
    ensure_block_hashes(req, full);
    auto& nodes = req.block_nodes;
    // Entries past the registered blocks are stale; missing ones (never expected) get nodes
    // nothing refers to, so that no hit can continue through them.
    while (static_cast<int32_t>(nodes.size()) < req.num_registered_blocks) {
      nodes.push_back(next_node_++);
    }
    nodes.resize(req.num_registered_blocks);
    for (int32_t i = req.num_registered_blocks; i < full; ++i) {
      const int32_t block = req.block_ids[i];
      const int32_t* tokens = req.token_ids.data() + i * bs;
      const uint64_t parent = i == 0 ? 0 : nodes[i - 1];
      uint64_t node;
      if (device_.register_block(block, req.block_hashes[i])) {
        node = next_node_++;
        store_key(false, block, node, parent, req.cache_salt, tokens, bs);
      } else {
        // The hash is taken: by the same tokens computed by another request (this block is a
        // duplicate and shares that node), or by a collision (a node no one else names).
        const int32_t cached = device_.lookup(req.block_hashes[i]);
        const bool same =
            cached >= 0 &&
            key_matches(full_keys_[cached], &full_tokens_[static_cast<size_t>(cached) * bs], parent,
                        req.cache_salt, tokens, bs);
        node = same ? full_keys_[cached].node : next_node_++;
      }
      nodes.push_back(node);
    }
    req.num_registered_blocks = full;
  }
  // After the full blocks: the prompt's tail names the last of them as its parent.
  cache_prompt_tail(req);
}

void KVCacheManager::cache_prompt_tail(Request& req) {
  const int32_t bs = config_.block_size;
  const int32_t prompt = req.num_prompt_tokens;
  if (!config_.enable_prefix_caching || req.prompt_tail_registered || prompt % bs == 0 ||
      req.num_computed_tokens < prompt) {
    return;
  }
  const int32_t idx = prompt / bs;
  if (idx >= static_cast<int32_t>(req.block_ids.size()) || req.num_registered_blocks < idx) return;
  ensure_block_hashes(req, idx);
  const int32_t* tokens = req.token_ids.data() + idx * bs;
  const BlockHash key = hasher_.hash(idx == 0 ? BlockHash{} : req.block_hashes[idx - 1],
                                     req.cache_salt, /*partial=*/true, tokens, prompt % bs);
  const int32_t block = req.block_ids[idx];
  if (device_.register_partial(block, key)) {
    store_key(true, block, 0, idx == 0 ? 0 : req.block_nodes[idx - 1], req.cache_salt, tokens,
              prompt % bs);
  }
  req.prompt_tail_registered = true;
}

void KVCacheManager::free(Request& req) {
  // Prompt blocks join the LRU part of the free list (end of the prompt first); blocks holding
  // only generated tokens are reused before any of them: prompts (system prompts, few-shot
  // examples, a chat's history) come back far more often than a particular answer, and when many
  // requests finish in one step this keeps every prompt ahead of the others' answers.
  const int32_t first_generated = ceil_div(req.num_prompt_tokens, config_.block_size);
  const int32_t n = static_cast<int32_t>(req.block_ids.size());
  for (int32_t i = std::min(first_generated, n); i-- > 0;) device_.release(&req.block_ids[i], 1);
  for (int32_t i = n; i-- > first_generated;) device_.release(&req.block_ids[i], 1, true);
  req.block_ids.clear();
  swap_.release_reversed(req.swapped_block_ids);
  req.swapped_block_ids.clear();
  req.num_registered_blocks = 0;
  req.prompt_tail_registered = false;
}

void KVCacheManager::free_tail(Request& req, int32_t num_tokens) {
  const auto keep = static_cast<size_t>(ceil_div(num_tokens, config_.block_size));
  while (req.block_ids.size() > keep) {
    device_.release(&req.block_ids.back(), 1, true);
    req.block_ids.pop_back();
  }
}

void KVCacheManager::fork(const Request& parent, Request& child) {
  if (!child.block_ids.empty()) {
    throw EngineError("fork: child " + child.id + " already holds blocks");
  }
  for (int32_t b : parent.block_ids) device_.touch(b);
  child.block_ids = parent.block_ids;
  child.block_hashes = parent.block_hashes;
  child.block_nodes = parent.block_nodes;
  child.num_registered_blocks = parent.num_registered_blocks;
  child.prompt_tail_registered = parent.prompt_tail_registered;
  child.num_computed_tokens = parent.num_computed_tokens;
}

void KVCacheManager::begin_step() {
  if (!copied_partial_sources_.empty()) {
    device_.release(copied_partial_sources_.data(),
                    static_cast<int32_t>(copied_partial_sources_.size()));
    copied_partial_sources_.clear();
  }
  if (released_swap_blocks_.empty()) return;
  swap_.release(released_swap_blocks_.data(), static_cast<int32_t>(released_swap_blocks_.size()));
  released_swap_blocks_.clear();
}

bool KVCacheManager::can_swap_out(const Request& req) const {
  return config_.num_cpu_blocks > 0 &&
         swap_.can_allocate(static_cast<int32_t>(req.block_ids.size()));
}

void KVCacheManager::swap_out(Request& req) {
  const int32_t n = static_cast<int32_t>(req.block_ids.size());
  req.swapped_block_ids.clear();
  swap_.allocate(n, req.swapped_block_ids);
  for (int32_t i = 0; i < n; ++i) {
    pending_.swap_out.push_back(req.block_ids[i]);
    pending_.swap_out.push_back(req.swapped_block_ids[i]);
  }
  device_.release_reversed(req.block_ids);
  req.block_ids.clear();
  req.num_registered_blocks = 0;
  req.prompt_tail_registered = false;
}

bool KVCacheManager::can_swap_in(const Request& req, int32_t num_new_tokens) const {
  const int32_t held = static_cast<int32_t>(req.swapped_block_ids.size());
  const int32_t total = ceil_div(req.num_computed_tokens + num_new_tokens, config_.block_size);
  return device_.can_allocate(std::max(held, total));
}

void KVCacheManager::swap_in(Request& req, int32_t num_new_tokens) {
  if (!can_swap_in(req, num_new_tokens)) {
    throw EngineError("swap_in called without room for request " + req.id);
  }
  const int32_t n = static_cast<int32_t>(req.swapped_block_ids.size());
  req.block_ids.clear();
  device_.allocate(n, req.block_ids);
  for (int32_t i = 0; i < n; ++i) {
    pending_.swap_in.push_back(req.swapped_block_ids[i]);
    pending_.swap_in.push_back(req.block_ids[i]);
  }
  // Swap-ins read their host blocks after every swap-out of the step has written, so the host
  // blocks may only be reused from the next step on.
  released_swap_blocks_.insert(released_swap_blocks_.end(), req.swapped_block_ids.rbegin(),
                               req.swapped_block_ids.rend());
  req.swapped_block_ids.clear();
  const int32_t total = ceil_div(req.num_computed_tokens + num_new_tokens, config_.block_size);
  const int32_t extra = total - n;
  if (extra > 0) device_.allocate(extra, req.block_ids);
}

}  // namespace fastllm
