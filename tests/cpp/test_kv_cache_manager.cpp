#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>

#include "fastllm/block_hash.h"
#include "fastllm/errors.h"
#include "fastllm/kv_cache_manager.h"

using namespace fastllm;

namespace {

Request make_request(const std::string& id, std::vector<int32_t> tokens, uint64_t salt = 0) {
  Request r;
  r.id = id;
  r.num_prompt_tokens = static_cast<int32_t>(tokens.size());
  r.token_ids = std::move(tokens);
  r.cache_salt = salt;
  return r;
}

std::vector<int32_t> iota_tokens(int n, int start = 100) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), start);
  return t;
}

// Admits a request with whatever prefix is cached, computes its whole prompt and registers it.
void prefill(KVCacheManager& kv, Request& r) {
  CachedPrefix prefix = kv.find_cached_prefix(r);
  const int32_t n = r.num_tokens() - prefix.num_tokens;
  ASSERT_TRUE(kv.can_allocate_slots(r, n, &prefix));
  kv.allocate_slots(r, n, &prefix);
  r.num_computed_tokens += n;
  kv.cache_full_blocks(r);
}

// A cache whose hash collides on purpose: block i of every prompt gets the same digest.
KVCacheConfig weak_hash_config(int32_t num_blocks) {
  KVCacheConfig c{num_blocks, 0, 8, true};
  c.hash_algo = PrefixHashAlgo::kTestWeak;
  return c;
}

std::string hex(const std::array<uint8_t, 32>& d) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (uint8_t b : d) {
    s += digits[b >> 4];
    s += digits[b & 15];
  }
  return s;
}

}  // namespace

// FIPS 180-4 examples: empty, one block, two blocks after padding, a million 'a's; through
// the CPU's SHA instructions where it has them, then through the portable code.
static void check_sha256_known_answers() {
  Sha256 h;
  EXPECT_EQ(hex(h.digest()), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  h.update("abc", 3);
  EXPECT_EQ(hex(h.digest()), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  const std::string two = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  Sha256 whole;
  whole.update(two.data(), two.size());
  EXPECT_EQ(hex(whole.digest()),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  // Fed in uneven pieces, with digests taken on the way: the same result.
  Sha256 pieces;
  for (size_t i = 0; i < two.size(); i += 5) {
    pieces.update(two.data() + i, std::min<size_t>(5, two.size() - i));
    pieces.digest();
  }
  EXPECT_EQ(pieces.digest(), whole.digest());
  // The one-shot form, at every length around the padding boundaries.
  std::string bytes;
  for (int n = 0; n < 200; ++n) {
    Sha256 s;
    s.update(bytes.data(), bytes.size());
    EXPECT_EQ(Sha256::hash(bytes.data(), bytes.size()), s.digest()) << n;
    bytes += static_cast<char>('a' + n % 26);
  }
  // A million 'a's (many full blocks).
  Sha256 million;
  const std::string a(1000, 'a');
  for (int i = 0; i < 1000; ++i) million.update(a.data(), a.size());
  EXPECT_EQ(hex(million.digest()),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(BlockHash, Sha256KnownAnswers) {
  check_sha256_known_answers();
  const bool previous = Sha256::set_cpu_extensions(false);
  EXPECT_FALSE(Sha256::uses_cpu_extensions());
  check_sha256_known_answers();
  Sha256::set_cpu_extensions(previous);
}

TEST(BlockHash, SipHash128KnownAnswer) {
  // The reference implementation's vectors: key 00..0f, messages 00 01 .. (n-1).
  SipHash128 h(0x0706050403020100ull, 0x0f0e0d0c0b0a0908ull);
  std::array<uint64_t, 2> d = h.digest();
  EXPECT_EQ(d[0], 0xe6a825ba047f81a3ull);
  EXPECT_EQ(d[1], 0x930255c71472f66dull);
}

TEST(BlockHash, DigestsDependOnParentSaltTokensAndKind) {
  for (PrefixHashAlgo algo : {PrefixHashAlgo::kSha256, PrefixHashAlgo::kFast}) {
    BlockHasher h(algo);
    const std::vector<int32_t> t = iota_tokens(16);
    auto digest = [&](const BlockHash& parent, uint64_t salt, bool partial, int32_t n) {
      h.begin(parent, salt, partial);
      h.add(t.data(), n);
      return h.digest();
    };
    const BlockHash base = digest({}, 0, false, 16);
    // The one-call form gives the streaming one's digests.
    for (int32_t n : {1, 5, 8, 16}) {
      for (bool partial : {false, true}) {
        const BlockHash once = h.hash(base, 3, partial, t.data(), n);
        EXPECT_EQ(once, digest(base, 3, partial, n)) << n;
      }
    }
    EXPECT_EQ(digest({}, 0, false, 16), base);
    EXPECT_NE(digest(base, 0, false, 16), base);
    EXPECT_NE(digest({}, 1, false, 16), base);
    EXPECT_NE(digest({}, 0, true, 16), base);
    EXPECT_NE(digest({}, 0, false, 15), base);
    // Wide digests: 256 bits for SHA-256, 128 for SipHash.
    EXPECT_NE(base.words[1], 0u);
    EXPECT_EQ(base.words[3] != 0, algo == PrefixHashAlgo::kSha256);
  }
}

// Under a hash where every prompt's block i collides, the stored tokens keep different prompts
// apart, and equal ones still share.
TEST(KVCacheManager, CollidingHashesNeverShareBlocks) {
  KVCacheManager kv(weak_hash_config(30));
  Request a = make_request("a", iota_tokens(20, 100));  // 2 full blocks + a 4-token tail
  prefill(kv, a);
  EXPECT_EQ(kv.prefix_hash_collisions(), 0);

  Request b = make_request("b", iota_tokens(20, 500));
  CachedPrefix pb = kv.find_cached_prefix(b);
  EXPECT_EQ(pb.num_tokens, 0);
  EXPECT_TRUE(pb.blocks.empty());
  EXPECT_EQ(pb.partial_block, -1);
  EXPECT_EQ(kv.prefix_hash_collisions(), 1);  // block 0; the walk stops there
  prefill(kv, b);
  for (int32_t x : b.block_ids) {
    EXPECT_EQ(std::count(a.block_ids.begin(), a.block_ids.end(), x), 0) << x;
  }

  // a's first block, then others: the first is shared, the second collides.
  std::vector<int32_t> tc = iota_tokens(8, 100);
  const std::vector<int32_t> rest = iota_tokens(12, 900);
  tc.insert(tc.end(), rest.begin(), rest.end());
  Request c = make_request("c", tc);
  const int64_t before_c = kv.prefix_hash_collisions();
  CachedPrefix pc = kv.find_cached_prefix(c);
  EXPECT_EQ(pc.blocks, std::vector<int32_t>{a.block_ids[0]});
  EXPECT_EQ(pc.num_tokens, 8);
  EXPECT_EQ(kv.prefix_hash_collisions(), before_c + 1);

  // a's full blocks, another tail of the same length: the tail's key collides.
  std::vector<int32_t> td = iota_tokens(16, 100);
  td.insert(td.end(), {1, 2, 3, 4});
  Request d = make_request("d", td);
  CachedPrefix pd = kv.find_cached_prefix(d);
  EXPECT_EQ(pd.blocks, (std::vector<int32_t>{a.block_ids[0], a.block_ids[1]}));
  EXPECT_EQ(pd.partial_block, -1);
  EXPECT_EQ(pd.num_tokens, 16);
  EXPECT_EQ(kv.prefix_hash_collisions(), before_c + 2);

  // The weak hash ignores the salt too; the stored salt does not.
  Request e = make_request("e", iota_tokens(20, 100), /*salt=*/7);
  EXPECT_EQ(kv.find_cached_prefix(e).num_tokens, 0);
  EXPECT_EQ(kv.prefix_hash_collisions(), before_c + 3);

  // a's prompt again: all of a's blocks and 3 of its 4 tail tokens.
  Request f = make_request("f", iota_tokens(20, 100));
  CachedPrefix pf = kv.find_cached_prefix(f);
  EXPECT_EQ(pf.blocks, (std::vector<int32_t>{a.block_ids[0], a.block_ids[1]}));
  EXPECT_EQ(pf.partial_block, a.block_ids[2]);
  EXPECT_EQ(pf.num_tokens, 19);
  EXPECT_EQ(kv.prefix_hash_collisions(), before_c + 3);
}

// Two requests computing the same prompt at once: the second's blocks are duplicates (the first's
// hold the index), and a block after them, registered by the second, still chains to the first's.
TEST(KVCacheManager, DuplicateBlocksChainToTheIndexedOnes) {
  KVCacheManager kv(weak_hash_config(30));
  Request a = make_request("a", iota_tokens(8));
  std::vector<int32_t> tb = iota_tokens(8);
  const std::vector<int32_t> more = iota_tokens(8, 700);
  tb.insert(tb.end(), more.begin(), more.end());
  tb.push_back(1);
  Request b = make_request("b", tb);
  CachedPrefix pa = kv.find_cached_prefix(a), pb = kv.find_cached_prefix(b);
  kv.allocate_slots(a, 8, &pa);
  kv.allocate_slots(b, 17, &pb);
  a.num_computed_tokens = 8;
  b.num_computed_tokens = 17;
  kv.cache_full_blocks(a);
  kv.cache_full_blocks(b);
  ASSERT_NE(a.block_ids[0], b.block_ids[0]);
  Request c = make_request("c", tb);
  CachedPrefix pc = kv.find_cached_prefix(c);
  EXPECT_EQ(pc.blocks, (std::vector<int32_t>{a.block_ids[0], b.block_ids[1]}));
  EXPECT_EQ(pc.num_tokens, 16);
  EXPECT_EQ(kv.prefix_hash_collisions(), 0);
}

TEST(KVCacheManager, AllocatesCeilOfTokensOverBlockSize) {
  KVCacheManager kv({/*gpu=*/10, /*cpu=*/0, /*bs=*/8, /*prefix=*/false});
  Request r = make_request("a", iota_tokens(17));
  EXPECT_EQ(kv.num_blocks_needed(r, 17), 3);
  kv.allocate_slots(r, 17);
  EXPECT_EQ(r.block_ids.size(), 3u);
  r.num_computed_tokens = 17;
  EXPECT_EQ(kv.num_blocks_needed(r, 7), 0);  // fills the third block
  EXPECT_EQ(kv.num_blocks_needed(r, 8), 1);
  kv.free(r);
  EXPECT_EQ(kv.device_pool().num_free_blocks(), 9);
}

TEST(KVCacheManager, PrefixHitAcrossRequestsSharesBlocks) {
  KVCacheManager kv({10, 0, 8, true});
  std::vector<int32_t> shared = iota_tokens(16);
  std::vector<int32_t> ta = shared, tb = shared;
  ta.insert(ta.end(), {1, 2, 3});
  tb.insert(tb.end(), {4, 5, 6, 7});
  Request a = make_request("a", ta);
  prefill(kv, a);
  Request b = make_request("b", tb);
  CachedPrefix p = kv.find_cached_prefix(b);
  EXPECT_EQ(p.num_tokens, 16);
  ASSERT_EQ(p.blocks.size(), 2u);
  EXPECT_EQ(p.blocks[0], a.block_ids[0]);
  EXPECT_EQ(p.blocks[1], a.block_ids[1]);
  kv.allocate_slots(b, b.num_tokens() - 16, &p);
  EXPECT_EQ(b.num_computed_tokens, 16);
  EXPECT_EQ(kv.device_pool().ref_count(a.block_ids[0]), 2);
  EXPECT_NE(b.block_ids[2], a.block_ids[2]);
  EXPECT_EQ(kv.prefix_hits(), 16);
  EXPECT_EQ(kv.prefix_queries(), 19 + 20);
}

TEST(KVCacheManager, PrefixHitLeavesOneTokenToCompute) {
  KVCacheManager kv({10, 0, 8, true});
  Request a = make_request("a", iota_tokens(16));
  prefill(kv, a);
  // Same 16 tokens: both blocks are cached, but the last token must still be computed, so the
  // first block is shared and the second serves its first 7 tokens through a copy.
  Request b = make_request("b", iota_tokens(16));
  CachedPrefix p = kv.find_cached_prefix(b);
  ASSERT_EQ(p.blocks.size(), 1u);
  EXPECT_EQ(p.blocks[0], a.block_ids[0]);
  EXPECT_EQ(p.partial_block, a.block_ids[1]);
  EXPECT_EQ(p.partial_tokens, 7);
  EXPECT_EQ(p.num_tokens, 15);
  kv.allocate_slots(b, 1, &p);
  EXPECT_EQ(b.num_computed_tokens, 15);
  EXPECT_NE(b.block_ids[1], a.block_ids[1]);  // its own copy, written from token 15 on
  // A prompt of one cached block: 7 of its 8 tokens.
  Request d = make_request("d", iota_tokens(8));
  CachedPrefix q = kv.find_cached_prefix(d);
  EXPECT_TRUE(q.blocks.empty());
  EXPECT_EQ(q.partial_block, a.block_ids[0]);
  EXPECT_EQ(q.num_tokens, 7);
  // 17 tokens: both full blocks can be reused.
  std::vector<int32_t> t = iota_tokens(16);
  t.push_back(9);
  Request c = make_request("c", t);
  EXPECT_EQ(kv.find_cached_prefix(c).num_tokens, 16);
}

TEST(KVCacheManager, PromptTailInAPartialBlockIsReusedThroughACopy) {
  KVCacheManager kv({12, 0, 8, true});
  Request a = make_request("a", iota_tokens(11));  // one full block + 3 tokens
  prefill(kv, a);
  // The same prompt: the full block, then 2 of the 3 tail tokens (the last one is computed).
  Request b = make_request("b", iota_tokens(11));
  CachedPrefix p = kv.find_cached_prefix(b);
  ASSERT_EQ(p.blocks.size(), 1u);
  EXPECT_EQ(p.blocks[0], a.block_ids[0]);
  EXPECT_EQ(p.partial_block, a.block_ids[1]);
  EXPECT_EQ(p.partial_tokens, 2);
  EXPECT_EQ(p.num_tokens, 10);
  EXPECT_EQ(kv.num_blocks_needed(b, 1, &p), 1);  // the copy of the tail block
  kv.allocate_slots(b, 1, &p);
  EXPECT_EQ(b.num_computed_tokens, 10);
  ASSERT_EQ(b.block_ids.size(), 2u);
  EXPECT_EQ(b.block_ids[0], a.block_ids[0]);
  EXPECT_NE(b.block_ids[1], a.block_ids[1]);
  const std::vector<int32_t> copy = {a.block_ids[1], b.block_ids[1]};
  EXPECT_EQ(kv.pending_ops().copy, copy);
  EXPECT_EQ(kv.prefix_hits(), 10);
  // The source stays referenced until the step that copies it has run.
  kv.free(a);
  EXPECT_EQ(kv.device_pool().ref_count(copy[0]), 1);
  kv.begin_step();
  EXPECT_EQ(kv.device_pool().ref_count(copy[0]), 0);

  // A tail is keyed by all of its tokens: a prompt sharing only 2 of the 3 reuses the full
  // block alone, as does one diverging in the tail's first token.
  std::vector<int32_t> t = iota_tokens(10);
  t.push_back(7);
  t.push_back(7);
  Request c = make_request("c", t);
  CachedPrefix pc = kv.find_cached_prefix(c);
  EXPECT_EQ(pc.num_tokens, 8);
  EXPECT_EQ(pc.partial_block, -1);
  std::vector<int32_t> u = iota_tokens(8);
  u.insert(u.end(), {1, 2, 3});
  Request d = make_request("d", u);
  CachedPrefix pd = kv.find_cached_prefix(d);
  EXPECT_EQ(pd.num_tokens, 8);
  EXPECT_EQ(pd.partial_block, -1);
}

TEST(KVCacheManager, AnswersAreEvictedBeforeAnyPrompt) {
  KVCacheManager kv({9, 0, 8, true});  // 8 usable blocks
  // Two requests of 16 prompt + 16 generated tokens, computed and cached, finishing together.
  std::vector<Request> done;
  for (int k = 0; k < 2; ++k) {
    Request r = make_request(k == 0 ? "a" : "b", iota_tokens(32, 1000 * (k + 1)));
    r.num_prompt_tokens = 16;
    kv.allocate_slots(r, 32);
    r.num_computed_tokens = 32;
    kv.cache_full_blocks(r);
    done.push_back(std::move(r));
  }
  for (Request& r : done) kv.free(r);
  // A new request needing 4 blocks takes the 4 answer blocks; both prompts stay cached.
  Request c = make_request("c", iota_tokens(32, 9000));
  kv.allocate_slots(c, 32);
  for (int k = 0; k < 2; ++k) {
    std::vector<int32_t> prompt = iota_tokens(16, 1000 * (k + 1));
    prompt.push_back(7);
    Request again = make_request("again", prompt);
    EXPECT_EQ(kv.find_cached_prefix(again).num_tokens, 16) << k;
  }
}

TEST(KVCacheManager, EvictingAPartialBlockDropsItsKey) {
  KVCacheManager kv({4, 0, 8, true});  // 3 usable blocks
  Request a = make_request("a", iota_tokens(5));
  prefill(kv, a);
  kv.free(a);
  Request b = make_request("b", iota_tokens(5));
  EXPECT_EQ(kv.find_cached_prefix(b).num_tokens, 4);
  Request c = make_request("c", iota_tokens(24, 5000));  // needs every block
  prefill(kv, c);
  EXPECT_EQ(kv.find_cached_prefix(b).num_tokens, 0);
  kv.free(c);
  EXPECT_TRUE(kv.reset_prefix_cache());
  EXPECT_EQ(kv.find_cached_prefix(b).num_tokens, 0);
}

TEST(KVCacheManager, HitsSurviveFreeUntilEvicted) {
  KVCacheManager kv({4, 0, 8, true});  // 3 usable blocks
  Request a = make_request("a", iota_tokens(17));
  prefill(kv, a);
  kv.free(a);
  Request b = make_request("b", iota_tokens(17));
  CachedPrefix p = kv.find_cached_prefix(b);
  EXPECT_EQ(p.num_tokens, 16);
  // The two cached blocks are free, so taking them counts against the free list.
  EXPECT_EQ(kv.num_blocks_needed(b, 1, &p), 3);
  // A different request needing every block evicts the cache.
  Request c = make_request("c", iota_tokens(24, 5000));
  prefill(kv, c);
  EXPECT_EQ(kv.find_cached_prefix(b).num_tokens, 0);
}

TEST(KVCacheManager, SaltSeparatesPrefixes) {
  KVCacheManager kv({10, 0, 8, true});
  Request a = make_request("a", iota_tokens(17), /*salt=*/1);
  prefill(kv, a);
  Request b = make_request("b", iota_tokens(17), /*salt=*/2);
  EXPECT_EQ(kv.find_cached_prefix(b).num_tokens, 0);
  Request c = make_request("c", iota_tokens(17), /*salt=*/1);
  EXPECT_EQ(kv.find_cached_prefix(c).num_tokens, 16);
}

TEST(KVCacheManager, ChainedHashesDistinguishEqualBlocksAfterDifferentPrefixes) {
  KVCacheManager kv({10, 0, 8, true});
  std::vector<int32_t> ta = iota_tokens(8, 0), tb = iota_tokens(8, 50);
  std::vector<int32_t> tail = iota_tokens(9, 900);
  ta.insert(ta.end(), tail.begin(), tail.end());
  tb.insert(tb.end(), tail.begin(), tail.end());
  Request a = make_request("a", ta);
  prefill(kv, a);
  Request b = make_request("b", tb);
  EXPECT_EQ(kv.find_cached_prefix(b).num_tokens, 0);
}

TEST(KVCacheManager, PromptLogprobsDisablePrefixHits) {
  KVCacheManager kv({10, 0, 8, true});
  Request a = make_request("a", iota_tokens(17));
  prefill(kv, a);
  Request b = make_request("b", iota_tokens(17));
  b.params.prompt_logprobs = 1;
  EXPECT_EQ(kv.find_cached_prefix(b).num_tokens, 0);
}

TEST(KVCacheManager, ForkSharesBlocksAndCopiesOnWrite) {
  KVCacheManager kv({10, 0, 8, false});
  Request parent = make_request("p", iota_tokens(12));
  kv.allocate_slots(parent, 12);
  parent.num_computed_tokens = 12;
  Request child = make_request("c", iota_tokens(12));
  kv.fork(parent, child);
  EXPECT_EQ(child.block_ids, parent.block_ids);
  EXPECT_EQ(child.num_computed_tokens, 12);
  EXPECT_EQ(kv.device_pool().ref_count(parent.block_ids[1]), 2);
  const int32_t shared_partial = parent.block_ids[1];
  // The child writes position 12 into the shared partial block: it gets its own copy first.
  EXPECT_EQ(kv.num_blocks_needed(child, 1), 1);
  kv.allocate_slots(child, 1);
  EXPECT_EQ(child.block_ids[0], parent.block_ids[0]);  // full block stays shared
  EXPECT_NE(child.block_ids[1], shared_partial);
  ASSERT_EQ(kv.pending_ops().copy.size(), 2u);
  EXPECT_EQ(kv.pending_ops().copy[0], shared_partial);
  EXPECT_EQ(kv.pending_ops().copy[1], child.block_ids[1]);
  EXPECT_EQ(kv.device_pool().ref_count(shared_partial), 1);
  // The parent now owns its partial block alone: no copy for it.
  EXPECT_EQ(kv.num_blocks_needed(parent, 1), 0);
  kv.free(parent);
  kv.free(child);
  EXPECT_EQ(kv.device_pool().num_free_blocks(), 9);
}

TEST(KVCacheManager, SwapOutAndInMovesBlocksThroughTheSwapSpace) {
  KVCacheManager kv({6, 6, 8, true});
  Request r = make_request("r", iota_tokens(20));
  prefill(kv, r);
  const std::vector<int32_t> device_blocks = r.block_ids;
  ASSERT_TRUE(kv.can_swap_out(r));
  kv.swap_out(r);
  EXPECT_TRUE(r.block_ids.empty());
  ASSERT_EQ(r.swapped_block_ids.size(), 3u);
  EXPECT_EQ(kv.device_pool().num_free_blocks(), 5);
  EXPECT_EQ(kv.swap_pool().num_free_blocks(), 2);
  ASSERT_EQ(kv.pending_ops().swap_out.size(), 6u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(kv.pending_ops().swap_out[2 * i], device_blocks[i]);
    EXPECT_EQ(kv.pending_ops().swap_out[2 * i + 1], r.swapped_block_ids[i]);
  }
  kv.pending_ops().clear();
  const std::vector<int32_t> host_blocks = r.swapped_block_ids;
  ASSERT_TRUE(kv.can_swap_in(r, 1));
  kv.swap_in(r, 1);
  EXPECT_EQ(r.block_ids.size(), 3u);
  EXPECT_TRUE(r.swapped_block_ids.empty());
  ASSERT_EQ(kv.pending_ops().swap_in.size(), 6u);
  EXPECT_EQ(kv.pending_ops().swap_in[0], host_blocks[0]);
  EXPECT_EQ(kv.pending_ops().swap_in[1], r.block_ids[0]);
  // Host blocks come back only after the step that reads them.
  EXPECT_EQ(kv.swap_pool().num_free_blocks(), 2);
  kv.begin_step();
  EXPECT_EQ(kv.swap_pool().num_free_blocks(), 5);
}

TEST(KVCacheManager, SwapOutNeedsSwapSpace) {
  KVCacheManager kv({6, 0, 8, false});
  Request r = make_request("r", iota_tokens(10));
  kv.allocate_slots(r, 10);
  EXPECT_FALSE(kv.can_swap_out(r));
}

TEST(KVCacheManager, RejectsBadGeometry) {
  EXPECT_THROW(KVCacheManager({10, 0, 12, true}), ConfigError);
  EXPECT_THROW(KVCacheManager({1, 0, 16, true}), ConfigError);
}

TEST(KVCacheManager, FreedBlocksAreReusedBeforeFreshOnesAroundAPrefixHit) {
  KVCacheManager kv({100, 0, 8, true});
  std::vector<int32_t> ta = iota_tokens(17);  // blocks 1 2 full, 3 partial
  Request a = make_request("a", ta);
  prefill(kv, a);
  ASSERT_EQ(a.block_ids, (std::vector<int32_t>{1, 2, 3}));
  kv.free(a);  // all cached (3 under its partial key), the end of the sequence first: 3 2 1
  // b shares a's first block only: it takes block 1 back and, with the cache's headroom
  // (touched 3 < 2 x peak 3), fresh blocks rather than evicting 3 or 2.
  std::vector<int32_t> tb(ta.begin(), ta.begin() + 8);
  std::vector<int32_t> tail = iota_tokens(12, 7000);
  tb.insert(tb.end(), tail.begin(), tail.end());
  Request b = make_request("b", tb);
  prefill(kv, b);
  EXPECT_EQ(b.block_ids, (std::vector<int32_t>{1, 4, 5}));
  EXPECT_EQ(kv.prefix_hits(), 8);
  EXPECT_EQ(kv.device_pool().num_touched_blocks(), 5);
  // Both of a's full blocks are still cached (the first held by b).
  Request c = make_request("c", ta);
  EXPECT_EQ(kv.find_cached_prefix(c).num_tokens, 16);
  kv.free(b);
  EXPECT_EQ(kv.device_pool().num_free_blocks(), 99);
  EXPECT_EQ(kv.device_pool().num_touched_blocks(), 5);
}
