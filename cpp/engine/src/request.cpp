#include "fastllm/request.h"

#include <cmath>
#include <limits>
#include <string>

#include "fastllm/errors.h"
#include "fastllm/sampling_params.h"

namespace fastllm {

namespace {

void require(bool ok, const std::string& message) {
  if (!ok) throw InvalidRequestError(message);
}

}  // namespace

void SamplingParams::validate(int32_t max_logprobs) const {
  require(n >= 1, "n must be at least 1, got " + std::to_string(n));
  require(max_tokens == -1 || max_tokens >= 1,
          "max_tokens must be at least 1, got " + std::to_string(max_tokens));
  require(min_tokens >= 0, "min_tokens must be non-negative, got " + std::to_string(min_tokens));
  require(max_tokens == -1 || min_tokens <= max_tokens,
          "min_tokens (" + std::to_string(min_tokens) + ") must not exceed max_tokens (" +
              std::to_string(max_tokens) + ")");
  require(std::isfinite(temperature) && temperature >= 0.0f,
          "temperature must be a non-negative number, got " + std::to_string(temperature));
  require(std::isfinite(top_p) && top_p > 0.0f && top_p <= 1.0f,
          "top_p must be in (0, 1], got " + std::to_string(top_p));
  require(top_k >= -1, "top_k must be -1 (off), 0 (off) or positive, got " + std::to_string(top_k));
  require(std::isfinite(min_p) && min_p >= 0.0f && min_p <= 1.0f,
          "min_p must be in [0, 1], got " + std::to_string(min_p));
  require(std::isfinite(presence_penalty) && presence_penalty >= -2.0f && presence_penalty <= 2.0f,
          "presence_penalty must be in [-2, 2], got " + std::to_string(presence_penalty));
  require(
      std::isfinite(frequency_penalty) && frequency_penalty >= -2.0f && frequency_penalty <= 2.0f,
      "frequency_penalty must be in [-2, 2], got " + std::to_string(frequency_penalty));
  require(std::isfinite(repetition_penalty) && repetition_penalty > 0.0f,
          "repetition_penalty must be positive, got " + std::to_string(repetition_penalty));
  require(seed >= -1, "seed must be -1 (none) or non-negative, got " + std::to_string(seed));
  // Child i samples with seed + i.
  require(seed <= std::numeric_limits<int64_t>::max() - (n - 1),
          "seed + n - 1 must fit in a signed 64-bit integer, got seed " + std::to_string(seed));
  require(logprobs >= -1 && logprobs <= max_logprobs, "logprobs must be in [0, " +
                                                          std::to_string(max_logprobs) + "], got " +
                                                          std::to_string(logprobs));
  require(prompt_logprobs >= -1 && prompt_logprobs <= max_logprobs,
          "prompt_logprobs must be in [0, " + std::to_string(max_logprobs) + "], got " +
              std::to_string(prompt_logprobs));
  for (int32_t t : stop_token_ids) {
    require(t >= 0, "stop_token_ids must be non-negative, got " + std::to_string(t));
  }
  require(logit_bias_ids.size() == logit_bias_values.size(),
          "logit_bias ids and values must have the same length");
  for (size_t i = 0; i < logit_bias_ids.size(); ++i) {
    require(logit_bias_ids[i] >= 0,
            "logit_bias token ids must be non-negative, got " + std::to_string(logit_bias_ids[i]));
    require(
        std::isfinite(logit_bias_values[i]) && logit_bias_values[i] >= -100.0f &&
            logit_bias_values[i] <= 100.0f,
        "logit_bias values must be in [-100, 100], got " + std::to_string(logit_bias_values[i]));
  }
  for (int32_t t : allowed_token_ids) {
    require(t >= 0, "allowed_token_ids must be non-negative, got " + std::to_string(t));
  }
}

void SamplingParams::check_vocab(int32_t vocab_size) const {
  if (vocab_size <= 0) return;
  auto check = [vocab_size](const std::vector<int32_t>& ids, const char* what) {
    for (int32_t t : ids) {
      require(t < vocab_size, std::string(what) + " has token id " + std::to_string(t) +
                                  " outside the vocabulary of " + std::to_string(vocab_size));
    }
  };
  check(stop_token_ids, "stop_token_ids");
  check(logit_bias_ids, "logit_bias");
  check(allowed_token_ids, "allowed_token_ids");
}

FinishReason finish_reason_of(RequestStatus s) {
  switch (s) {
    case RequestStatus::kFinishedStopped:
      return FinishReason::kStop;
    case RequestStatus::kFinishedLength:
      return FinishReason::kLength;
    case RequestStatus::kFinishedAborted:
      return FinishReason::kAbort;
    case RequestStatus::kFinishedError:
      return FinishReason::kError;
    default:
      return FinishReason::kNone;
  }
}

const char* to_string(FinishReason r) {
  switch (r) {
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kAbort:
      return "abort";
    case FinishReason::kError:
      return "error";
    case FinishReason::kNone:
      break;
  }
  return "none";
}

const char* to_string(RequestStatus s) {
  switch (s) {
    case RequestStatus::kWaiting:
      return "waiting";
    case RequestStatus::kRunning:
      return "running";
    case RequestStatus::kPreempted:
      return "preempted";
    case RequestStatus::kSwapped:
      return "swapped";
    case RequestStatus::kFinishedStopped:
      return "finished_stopped";
    case RequestStatus::kFinishedLength:
      return "finished_length";
    case RequestStatus::kFinishedAborted:
      return "finished_aborted";
    case RequestStatus::kFinishedError:
      return "finished_error";
  }
  return "unknown";
}

}  // namespace fastllm
