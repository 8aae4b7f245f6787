#include "fastllm/block_hash.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <random>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#define FASTLLM_SHA_NI 1
#endif

namespace fastllm {

const char* to_string(PrefixHashAlgo algo) {
  switch (algo) {
    case PrefixHashAlgo::kSha256:
      return "sha256";
    case PrefixHashAlgo::kFast:
      return "fast";
    case PrefixHashAlgo::kTestWeak:
      return "test_weak";
  }
  return "?";
}

namespace {

constexpr uint32_t kSha256K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

inline uint32_t rotr32(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }
inline uint64_t rotl64(uint64_t x, int n) { return (x << n) | (x >> (64 - n)); }

inline void sip_round(std::array<uint64_t, 4>& v) {
  v[0] += v[1];
  v[1] = rotl64(v[1], 13);
  v[1] ^= v[0];
  v[0] = rotl64(v[0], 32);
  v[2] += v[3];
  v[3] = rotl64(v[3], 16);
  v[3] ^= v[2];
  v[0] += v[3];
  v[3] = rotl64(v[3], 21);
  v[3] ^= v[0];
  v[2] += v[1];
  v[1] = rotl64(v[1], 17);
  v[1] ^= v[2];
  v[2] = rotl64(v[2], 32);
}

inline void sip_absorb(std::array<uint64_t, 4>& v, uint64_t m) {
  v[3] ^= m;
  sip_round(v);
  sip_round(v);
  v[0] ^= m;
}

// The per-process SipHash key: drawn once, never leaves the process, so digests cannot be
// predicted (or collisions searched for) from outside.
const std::array<uint64_t, 2>& process_key() {
  static const std::array<uint64_t, 2> key = [] {
    std::random_device rd;
    std::array<uint64_t, 2> k{};
    for (uint64_t& w : k) w = (static_cast<uint64_t>(rd()) << 32) ^ rd();
    return k;
  }();
  return key;
}

// Little-endian serialization, so digests do not depend on the host's byte order.
inline void put_u32(uint8_t* p, uint32_t x) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(x >> (8 * i));
}
inline void put_u64(uint8_t* p, uint64_t x) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(x >> (8 * i));
}

#ifdef FASTLLM_SHA_NI
// The x86 SHA extensions do a block in about a tenth of the portable code's time. A running
// engine hashes every block that fills up (16 per step at 256 sequences of block size 16), so
// this keeps SHA-256 out of the step time. The usual two-rounds-per-instruction layout: the state
// lives as ABEF / CDGH, the message schedule in four registers that rotate.
__attribute__((target("sha,sse4.1,ssse3"))) void compress_sha_ni(uint32_t* state,
                                                                 const uint8_t* p) {
  const __m128i kByteSwap = _mm_set_epi64x(0x0c0d0e0f08090a0bll, 0x0405060700010203ll);
  __m128i tmp = _mm_shuffle_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(state)), 0xB1);
  __m128i s1 =
      _mm_shuffle_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(state + 4)), 0x1B);
  __m128i s0 = _mm_alignr_epi8(tmp, s1, 8);  // ABEF
  s1 = _mm_blend_epi16(s1, tmp, 0xF0);       // CDGH
  const __m128i abef = s0, cdgh = s1;
  __m128i m[4];
  for (int g = 0; g < 16; ++g) {
    if (g < 4) {
      m[g] = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * g)),
                              kByteSwap);
    }
    __m128i msg = _mm_add_epi32(
        m[g % 4], _mm_loadu_si128(reinterpret_cast<const __m128i*>(kSha256K + 4 * g)));
    s1 = _mm_sha256rnds2_epu32(s1, s0, msg);
    if (g >= 3 && g <= 14) {  // the next four schedule words
      __m128i& next = m[(g + 1) % 4];
      next = _mm_add_epi32(next, _mm_alignr_epi8(m[g % 4], m[(g + 3) % 4], 4));
      next = _mm_sha256msg2_epu32(next, m[g % 4]);
    }
    msg = _mm_shuffle_epi32(msg, 0x0E);
    s0 = _mm_sha256rnds2_epu32(s0, s1, msg);
    if (g >= 1 && g <= 12) m[(g + 3) % 4] = _mm_sha256msg1_epu32(m[(g + 3) % 4], m[g % 4]);
  }
  s0 = _mm_add_epi32(s0, abef);
  s1 = _mm_add_epi32(s1, cdgh);
  tmp = _mm_shuffle_epi32(s0, 0x1B);    // FEBA
  s1 = _mm_shuffle_epi32(s1, 0xB1);     // DCHG
  s0 = _mm_blend_epi16(tmp, s1, 0xF0);  // DCBA
  s1 = _mm_alignr_epi8(s1, tmp, 8);     // HGFE
  _mm_storeu_si128(reinterpret_cast<__m128i*>(state), s0);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(state + 4), s1);
}

bool cpu_has_sha() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  const bool sse41 = (c >> 19) & 1, ssse3 = (c >> 9) & 1;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return sse41 && ssse3 && ((b >> 29) & 1);
}
#endif

std::atomic<bool> g_sha_ni_enabled{true};

constexpr uint32_t kFullTag = 0x46424b31;     // "1KBF": a whole block
constexpr uint32_t kPartialTag = 0x50424b31;  // "1KBP": the first tokens of a block

// Header: domain tag, parent digest, salt. The token count needs no field: the hashes' own
// length padding already separates messages of different lengths.
constexpr size_t kHeaderBytes = 4 + 32 + 8;
void write_header(uint8_t* p, const BlockHash& parent, uint64_t salt, bool partial) {
  put_u32(p, partial ? kPartialTag : kFullTag);
  for (int i = 0; i < 4; ++i) put_u64(p + 4 + 8 * i, parent.words[i]);
  put_u64(p + 36, salt);
}

BlockHash to_block_hash(const std::array<uint8_t, 32>& d) {
  BlockHash h;
  for (int i = 0; i < 4; ++i) {
    uint64_t w = 0;
    for (int j = 0; j < 8; ++j) w = (w << 8) | d[8 * i + j];
    h.words[i] = w;
  }
  return h;
}

}  // namespace

void Sha256::reset() {
  state_ = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
            0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  buf_len_ = 0;
  total_ = 0;
}

bool Sha256::set_cpu_extensions(bool enabled) { return g_sha_ni_enabled.exchange(enabled); }

bool Sha256::uses_cpu_extensions() {
#ifdef FASTLLM_SHA_NI
  static const bool has = cpu_has_sha();
  return has && g_sha_ni_enabled.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

void Sha256::compress(const uint8_t* p) {
#ifdef FASTLLM_SHA_NI
  if (uses_cpu_extensions()) {
    compress_sha_ni(state_.data(), p);
    return;
  }
#endif
  uint32_t w[64];
  for (int i = 0; i < 16; ++i) {
    w[i] = (static_cast<uint32_t>(p[4 * i]) << 24) | (static_cast<uint32_t>(p[4 * i + 1]) << 16) |
           (static_cast<uint32_t>(p[4 * i + 2]) << 8) | p[4 * i + 3];
  }
  for (int i = 16; i < 64; ++i) {
    const uint32_t s0 = rotr32(w[i - 15], 7) ^ rotr32(w[i - 15], 18) ^ (w[i - 15] >> 3);
    const uint32_t s1 = rotr32(w[i - 2], 17) ^ rotr32(w[i - 2], 19) ^ (w[i - 2] >> 10);
    w[i] = w[i - 16] + s0 + w[i - 7] + s1;
  }
  uint32_t a = state_[0], b = state_[1], c = state_[2], d = state_[3];
  uint32_t e = state_[4], f = state_[5], g = state_[6], h = state_[7];
  for (int i = 0; i < 64; ++i) {
    const uint32_t s1 = rotr32(e, 6) ^ rotr32(e, 11) ^ rotr32(e, 25);
    const uint32_t ch = (e & f) ^ (~e & g);
    const uint32_t t1 = h + s1 + ch + kSha256K[i] + w[i];
    const uint32_t s0 = rotr32(a, 2) ^ rotr32(a, 13) ^ rotr32(a, 22);
    const uint32_t maj = (a & b) ^ (a & c) ^ (b & c);
    const uint32_t t2 = s0 + maj;
    h = g;
    g = f;
    f = e;
    e = d + t1;
    d = c;
    c = b;
    b = a;
    a = t1 + t2;
  }
  state_[0] += a;
  state_[1] += b;
  state_[2] += c;
  state_[3] += d;
  state_[4] += e;
  state_[5] += f;
  state_[6] += g;
  state_[7] += h;
}

void Sha256::update(const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  total_ += n;
  if (buf_len_ > 0) {
    const size_t take = std::min(n, buf_.size() - buf_len_);
    std::memcpy(buf_.data() + buf_len_, p, take);
    buf_len_ += take;
    p += take;
    n -= take;
    if (buf_len_ < buf_.size()) return;
    compress(buf_.data());
    buf_len_ = 0;
  }
  for (; n >= 64; p += 64, n -= 64) compress(p);
  if (n > 0) std::memcpy(buf_.data(), p, n);
  buf_len_ = n;
}

std::array<uint8_t, 32> Sha256::digest() const {
  Sha256 s = *this;
  const uint64_t bits = total_ * 8;
  uint8_t pad[72] = {0x80};
  // Pad to 56 bytes mod 64, then the message length in bits, big-endian.
  const size_t pad_len = (s.buf_len_ < 56 ? 56 : 120) - s.buf_len_;
  for (int i = 0; i < 8; ++i) pad[pad_len + i] = static_cast<uint8_t>(bits >> (56 - 8 * i));
  s.update(pad, pad_len + 8);
  std::array<uint8_t, 32> out{};
  for (int i = 0; i < 8; ++i) {
    for (int j = 0; j < 4; ++j) out[4 * i + j] = static_cast<uint8_t>(s.state_[i] >> (24 - 8 * j));
  }
  return out;
}

std::array<uint8_t, 32> Sha256::hash(const void* data, size_t n) {
  Sha256 s;
  const auto* p = static_cast<const uint8_t*>(data);
  const size_t whole = n / 64 * 64;
  for (size_t i = 0; i < whole; i += 64) s.compress(p + i);
  // The rest, 0x80, zeros up to 56 mod 64, then the length in bits, big-endian.
  uint8_t tail[128] = {};
  const size_t rest = n - whole;
  std::memcpy(tail, p + whole, rest);
  tail[rest] = 0x80;
  const size_t len = rest < 56 ? 64 : 128;
  const uint64_t bits = static_cast<uint64_t>(n) * 8;
  for (int i = 0; i < 8; ++i) tail[len - 8 + i] = static_cast<uint8_t>(bits >> (56 - 8 * i));
  s.compress(tail);
  if (len == 128) s.compress(tail + 64);
  std::array<uint8_t, 32> out{};
  for (int i = 0; i < 8; ++i) {
    for (int j = 0; j < 4; ++j) out[4 * i + j] = static_cast<uint8_t>(s.state_[i] >> (24 - 8 * j));
  }
  return out;
}

void SipHash128::reset(uint64_t k0, uint64_t k1) {
  v_ = {k0 ^ 0x736f6d6570736575ull, k1 ^ 0x646f72616e646f6dull ^ 0xee, k0 ^ 0x6c7967656e657261ull,
        k1 ^ 0x7465646279746573ull};
  tail_ = 0;
  tail_len_ = 0;
  total_ = 0;
}

void SipHash128::update(const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  total_ += n;
  for (size_t i = 0; i < n; ++i) {
    tail_ |= static_cast<uint64_t>(p[i]) << (8 * tail_len_);
    if (++tail_len_ == 8) {
      sip_absorb(v_, tail_);
      tail_ = 0;
      tail_len_ = 0;
    }
  }
}

std::array<uint64_t, 2> SipHash128::digest() const {
  std::array<uint64_t, 4> v = v_;
  sip_absorb(v, tail_ | (total_ << 56));
  v[2] ^= 0xee;
  for (int i = 0; i < 4; ++i) sip_round(v);
  const uint64_t lo = v[0] ^ v[1] ^ v[2] ^ v[3];
  v[1] ^= 0xdd;
  for (int i = 0; i < 4; ++i) sip_round(v);
  return {lo, v[0] ^ v[1] ^ v[2] ^ v[3]};
}

BlockHasher::BlockHasher(PrefixHashAlgo algo)
    : algo_(algo), sip_(process_key()[0], process_key()[1]) {}

void BlockHasher::begin(const BlockHash& parent, uint64_t salt, bool partial) {
  num_tokens_ = 0;
  partial_ = partial;
  parent_depth_ = parent.words[0];
  uint8_t head[kHeaderBytes];
  write_header(head, parent, salt, partial);
  if (algo_ == PrefixHashAlgo::kSha256) {
    sha_.reset();
    sha_.update(head, sizeof(head));
  } else if (algo_ == PrefixHashAlgo::kFast) {
    sip_.reset(process_key()[0], process_key()[1]);
    sip_.update(head, sizeof(head));
  }
}

void BlockHasher::add(const int32_t* tokens, int32_t n) {
  num_tokens_ += n;
  uint8_t buf[64 * 4];
  while (n > 0) {
    const int32_t m = std::min<int32_t>(n, 64);
    for (int32_t i = 0; i < m; ++i) put_u32(buf + 4 * i, static_cast<uint32_t>(tokens[i]));
    if (algo_ == PrefixHashAlgo::kSha256) {
      sha_.update(buf, 4 * static_cast<size_t>(m));
    } else if (algo_ == PrefixHashAlgo::kFast) {
      sip_.update(buf, 4 * static_cast<size_t>(m));
    }
    tokens += m;
    n -= m;
  }
}

BlockHash BlockHasher::hash(const BlockHash& parent, uint64_t salt, bool partial,
                            const int32_t* tokens, int32_t n) {
  constexpr int32_t kMaxTokens = 32;  // the largest block size
  if (algo_ != PrefixHashAlgo::kSha256 || n > kMaxTokens) {
    begin(parent, salt, partial);
    add(tokens, n);
    return digest();
  }
  // The same bytes as begin + add.
  uint8_t msg[kHeaderBytes + 4 * kMaxTokens];
  write_header(msg, parent, salt, partial);
  for (int32_t i = 0; i < n; ++i)
    put_u32(msg + kHeaderBytes + 4 * i, static_cast<uint32_t>(tokens[i]));
  return to_block_hash(Sha256::hash(msg, kHeaderBytes + 4 * static_cast<size_t>(n)));
}

BlockHash BlockHasher::digest() const {
  BlockHash h;
  switch (algo_) {
    case PrefixHashAlgo::kSha256:
      h = to_block_hash(sha_.digest());
      break;
    case PrefixHashAlgo::kFast: {
      const std::array<uint64_t, 2> d = sip_.digest();
      h.words[0] = d[0];
      h.words[1] = d[1];
      break;
    }
    case PrefixHashAlgo::kTestWeak:
      // Only the block's depth in its sequence (and a partial block's length) count: the salt
      // and the token values are ignored, so every prompt's block i collides with every other's.
      h.words[0] = parent_depth_ + (partial_ ? 0 : 1);
      h.words[1] = partial_ ? static_cast<uint64_t>(num_tokens_) : 0;
      h.words[2] = partial_ ? 1 : 0;
      break;
  }
  return h;
}

}  // namespace fastllm
