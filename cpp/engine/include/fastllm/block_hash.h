// Prefix-cache block hashes. A full KV block is found in the prefix cache by a digest of its
// parent block's digest, the request's extra keys (cache salt) and its token ids. Two requests
// that share a digest share KV, so the digest must be collision-resistant: a collision an
// attacker can find (or craft) would let one request attend to another user's KV. The cache also
// verifies every hit against the stored tokens (KVCacheManager), so a collision is never served.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>

namespace fastllm {

enum class PrefixHashAlgo {
  // SHA-256 over (domain tag, parent digest, cache salt, token ids): the full 256-bit digest.
  kSha256,
  // SipHash-2-4 with 128-bit output under a random per-process key. Cheaper than SHA-256 and
  // still unpredictable: without the key nobody can search for collisions offline, and 128 bits
  // put accidental ones out of reach. Digests differ between processes (no persistent cache).
  kFast,
  // Tests only: a block's digest is its position in the sequence (a partial block's: and its
  // length), so different prompts collide on purpose and the hit verification is what keeps
  // them apart.
  kTestWeak,
};

// "sha256", "fast" or "test_weak".
const char* to_string(PrefixHashAlgo algo);

// A block digest: 256 bits (SHA-256), or 128 bits followed by zeros (SipHash-128).
struct BlockHash {
  std::array<uint64_t, 4> words{};
  bool operator==(const BlockHash& o) const { return words == o.words; }
  bool operator!=(const BlockHash& o) const { return words != o.words; }
};

// Streaming SHA-256 (FIPS 180-4), self-contained so that the engine needs no crypto library.
class Sha256 {
 public:
  Sha256() { reset(); }
  void reset();
  void update(const void* data, size_t n);
  // Digest of the bytes so far; the object is left unchanged (more bytes may follow).
  std::array<uint8_t, 32> digest() const;
  // One-shot digest of n bytes: no buffering, no copy of the state.
  static std::array<uint8_t, 32> hash(const void* data, size_t n);

  // Whether blocks go through the CPU's SHA instructions (x86 SHA extensions, when present).
  static bool uses_cpu_extensions();
  // Tests: turns that path off (or back on) process-wide; returns the previous setting.
  static bool set_cpu_extensions(bool enabled);

 private:
  void compress(const uint8_t* block);
  std::array<uint32_t, 8> state_{};
  std::array<uint8_t, 64> buf_{};
  size_t buf_len_ = 0;
  uint64_t total_ = 0;
};

// Streaming SipHash-2-4 with 128-bit output (the reference's siphash with outlen 16).
class SipHash128 {
 public:
  SipHash128(uint64_t k0, uint64_t k1) { reset(k0, k1); }
  void reset(uint64_t k0, uint64_t k1);
  void update(const void* data, size_t n);
  // Digest of the bytes so far; the object is left unchanged.
  std::array<uint64_t, 2> digest() const;

 private:
  std::array<uint64_t, 4> v_{};
  uint64_t tail_ = 0;  // pending bytes, little-endian
  size_t tail_len_ = 0;
  uint64_t total_ = 0;
};

// Hashes one block: begin(parent, salt, partial), then tokens, then digest(). digest() may be
// taken after every token, which the partial-block lookup uses to hash growing prefixes in one
// pass. partial keeps partial-block keys apart from whole-block digests.
class BlockHasher {
 public:
  explicit BlockHasher(PrefixHashAlgo algo);
  void begin(const BlockHash& parent, uint64_t salt, bool partial);
  void add(const int32_t* tokens, int32_t n);
  BlockHash digest() const;
  // begin + add + digest in one call (SHA-256 hashes the serialized block in one pass).
  BlockHash hash(const BlockHash& parent, uint64_t salt, bool partial, const int32_t* tokens,
                 int32_t n);

 private:
  PrefixHashAlgo algo_;
  Sha256 sha_;
  SipHash128 sip_;
  int32_t num_tokens_ = 0;
  bool partial_ = false;
  uint64_t parent_depth_ = 0;  // kTestWeak: the parent's digest is its depth
};

}  // namespace fastllm

template <>
struct std::hash<fastllm::BlockHash> {
  // The digest is uniformly distributed already (for the real algorithms); its first word is
  // as good a bucket index as any.
  size_t operator()(const fastllm::BlockHash& h) const noexcept {
    return static_cast<size_t>(h.words[0] ^ (h.words[1] >> 7));
  }
};
