// CPU paged attention. Work items are (sequence, KV head, tile of query rows); each item gathers
// the scores of its tile's query heads against every key of its span in one pass over K, takes the
// softmax, then accumulates V in one pass, so each K/V row is read once per tile and converted to
// float once (fp16/bf16/fp8 caches) for all query heads of its GQA group.
#include "fastllm/kernels/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "parallel.h"
#include "vec.h"

namespace fastllm::kernels {

namespace {
constexpr int64_t kPartitionTokens = 512;  // must match the CUDA launcher
constexpr int64_t kMaxRowsPerTile = 16;    // query rows (token x head) sharing one pass over K/V
}  // namespace

void check_paged_attention_params(const PagedAttentionParams& p) {
  check_arg(p.num_tokens >= 0 && p.num_seqs >= 0, "paged_attention: negative sizes");
  check_arg(p.num_heads > 0 && p.num_kv_heads > 0 && p.num_heads % p.num_kv_heads == 0,
            "paged_attention: num_heads must be a positive multiple of num_kv_heads");
  const int64_t d = p.head_size;
  check_arg(d == 64 || d == 80 || d == 96 || d == 128 || d == 256,
            "paged_attention: head_size " + std::to_string(d) + " not in {64, 80, 96, 128, 256}");
  check_arg(p.block_size == 8 || p.block_size == 16 || p.block_size == 32,
            "paged_attention: block_size must be 8, 16 or 32");
  check_arg(!is_float8(p.dtype), "paged_attention: queries cannot be float8");
  check_arg(p.query_token_stride >= p.num_heads * d && p.out_token_stride >= p.num_heads * d,
            "paged_attention: token strides smaller than num_heads * head_size");
  check_arg(p.max_blocks_per_seq > 0 && p.num_blocks > 0, "paged_attention: empty block table");
  check_arg(p.k_scale > 0.0f && p.v_scale > 0.0f, "paged_attention: scales must be positive");
}

size_t paged_attention_workspace_bytes(int64_t num_tokens, int64_t num_heads, int64_t head_size,
                                       int64_t max_context_len) {
  const int64_t partitions = (max_context_len + kPartitionTokens - 1) / kPartitionTokens;
  if (partitions <= 1) return 0;
  return static_cast<size_t>(num_tokens * num_heads * partitions * (head_size + 2)) * sizeof(float);
}

void paged_attention_cpu(const PagedAttentionParams& p) {
  check_paged_attention_params(p);
  if (p.num_tokens == 0 || p.num_seqs == 0) return;
  const int64_t group = p.num_heads / p.num_kv_heads;
  const int64_t d = p.head_size;
  const int64_t tile_tokens = std::max<int64_t>(1, kMaxRowsPerTile / group);

  // Validate the sequence metadata once, and list the work items.
  struct Item {
    int64_t seq, first_token, num_tokens;
  };
  std::vector<Item> items;
  int64_t work = 0;  // query tokens x keys, summed over sequences
  check_arg(p.query_start_loc[0] == 0 && p.query_start_loc[p.num_seqs] == p.num_tokens,
            "paged_attention: query_start_loc must start at 0 and end at num_tokens");
  for (int64_t s = 0; s < p.num_seqs; ++s) {
    const int64_t begin = p.query_start_loc[s], end = p.query_start_loc[s + 1];
    check_arg(end >= begin, "paged_attention: query_start_loc must be non-decreasing");
    check_arg(p.context_lens[s] >= end - begin,
              "paged_attention: context_lens[" + std::to_string(s) + "] < query length");
    check_arg(p.context_lens[s] <= p.max_blocks_per_seq * p.block_size,
              "paged_attention: context_lens[" + std::to_string(s) + "] exceeds the block table");
    for (int64_t t = begin; t < end; t += tile_tokens)
      items.push_back({s, t, std::min(tile_tokens, end - t)});
    work += (end - begin) * p.context_lens[s];
  }

  const auto& ops = cpu::vec_ops();
  const size_t q_size = dtype_size(p.dtype);
  const size_t c_size = dtype_size(p.cache_dtype);
  const int64_t cache_row = p.num_kv_heads * d;  // elements per slot
  const int64_t row_bytes = d * static_cast<int64_t>(c_size);

  auto run_item = [&](int64_t index) {
    const Item& item = items[index / p.num_kv_heads];
    const int64_t kv_head = index % p.num_kv_heads;
    const int64_t rows = item.num_tokens * group;
    const int64_t begin = p.query_start_loc[item.seq];
    const int64_t context = p.context_lens[item.seq];
    const int64_t query_len = p.query_start_loc[item.seq + 1] - begin;
    const int32_t* table = p.block_tables + item.seq * p.max_blocks_per_seq;

    // Row r = token * group + g. Key range of a token at position pos: [lo(pos), pos].
    auto first_key = [&](int64_t pos) {
      return p.sliding_window > 0 ? std::max<int64_t>(0, pos - p.sliding_window + 1) : 0;
    };
    const int64_t pos0 = context - query_len + (item.first_token - begin);
    const int64_t pos_last = pos0 + item.num_tokens - 1;
    const int64_t key_begin = first_key(pos0);
    const int64_t span = pos_last + 1 - key_begin;

    float* q = cpu::scratch(1, rows * d);
    float* scores = cpu::scratch(2, rows * span);
    float* acc = cpu::scratch(3, rows * d);
    float* row_sum = cpu::scratch(5, rows);

    for (int64_t t = 0; t < item.num_tokens; ++t) {
      const char* src =
          static_cast<const char*>(p.query) +
          ((item.first_token + t) * p.query_token_stride + kv_head * group * d) * q_size;
      ops.load(src, p.dtype, q + t * group * d, group * d, 1.0f);
    }
    ops.scale(p.scale * p.k_scale, q, rows * d);  // fp8: fold the K scale into the query

    // This KV head's rows of the block holding key j (count of them from j) in `cache`.
    auto rows_at = [&](const void* cache, int64_t j) {
      const int64_t block_index = j / p.block_size;
      const int64_t slot = static_cast<int64_t>(table[block_index]) * p.block_size +
                           (j - block_index * p.block_size);
      return static_cast<const char*>(cache) + (slot * cache_row + kv_head * d) * c_size;
    };
    // Rows of one KV head sit cache_row apart (often a page or more), where hardware prefetchers
    // give up: each block's rows are fetched ahead by hand.
    auto prefetch_rows = [&](const char* rows, int64_t count) {
      for (int64_t r = 0; r < count; ++r)
        for (int64_t b = 0; b < row_bytes; b += 64)
          __builtin_prefetch(rows + r * cache_row * c_size + b, 0, 3);
    };
    // Visits the span block by block: fn(cache rows of block, first key j0, key count), with
    // the next block's rows fetched while this one is computed and, when `also` is given (the
    // value cache during the key pass), the same block's rows there: the second pass then finds
    // them in cache instead of waiting on memory a block at a time.
    auto for_each_block = [&](const void* cache, const void* also, auto&& fn) {
      for (int64_t j0 = key_begin; j0 <= pos_last;) {
        const int64_t offset = j0 % p.block_size;
        const int64_t count = std::min(p.block_size - offset, pos_last + 1 - j0);
        if (j0 + count <= pos_last)
          prefetch_rows(rows_at(cache, j0 + count),
                        std::min(p.block_size, pos_last + 1 - (j0 + count)));
        if (also != nullptr) prefetch_rows(rows_at(also, j0), count);
        fn(rows_at(cache, j0), j0, count);
        j0 += count;
      }
    };
    // Pass 1: scores of all rows against each key of the span.
    for_each_block(p.key_cache, p.value_cache, [&](const char* keys, int64_t j0, int64_t count) {
      ops.attn_scores(keys, cache_row, p.cache_dtype, count, q, rows, d, scores + (j0 - key_begin),
                      span);
    });
    // Masks, softcap and softmax per row.
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t pos = pos0 + r / group;
      float* s = scores + r * span;
      const int64_t lo = first_key(pos) - key_begin;
      const int64_t hi = pos - key_begin;  // inclusive
      // Masked keys weigh exactly 0. The exponentials cover the row's own keys only, so the
      // vector lanes they fall in (and hence their bits) do not depend on the tile: a token's
      // output is the same whichever query rows share its step (speculative decoding verifies
      // drafts as a multi-token query and must reproduce one-token decode exactly).
      for (int64_t j = 0; j < lo; ++j) s[j] = 0.0f;
      for (int64_t j = hi + 1; j < span; ++j) s[j] = 0.0f;
      if (p.softcap > 0.0f) {
        const float inv = 1.0f / p.softcap;
        for (int64_t j = lo; j <= hi; ++j) s[j] = p.softcap * std::tanh(s[j] * inv);
      }
      const float m = ops.max(s + lo, hi - lo + 1);
      row_sum[r] = ops.exp_shift_sum(s + lo, hi - lo + 1, m);
    }
    // Pass 2: weighted sum of V rows.
    std::fill(acc, acc + rows * d, 0.0f);
    for_each_block(p.value_cache, nullptr, [&](const char* values, int64_t j0, int64_t count) {
      ops.attn_values(values, cache_row, p.cache_dtype, count, scores + (j0 - key_begin), span,
                      rows, d, acc);
    });
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = r / group, g = r % group;
      ops.scale(p.v_scale / row_sum[r], acc + r * d, d);
      char* dst =
          static_cast<char*>(p.out) +
          ((item.first_token + t) * p.out_token_stride + (kv_head * group + g) * d) * q_size;
      ops.store(acc + r * d, p.dtype, dst, d, 1.0f);
    }
  };
  const int64_t num_items = static_cast<int64_t>(items.size()) * p.num_kv_heads;
  // A small step (one decode token over a short context: a few microseconds of work) runs on the
  // caller; waking the pool would cost more than it saves. From about 128 keys of one token
  // (8 heads x 64) the two threads win: the rows come from memory, and two threads wait on it
  // side by side.
  if (work * p.num_heads * d < (int64_t{1} << 16)) {
    for (int64_t i = 0; i < num_items; ++i) run_item(i);
    return;
  }
  cpu::parallel_for(num_items, run_item);
}

}  // namespace fastllm::kernels
