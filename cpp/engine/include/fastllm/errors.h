// Typed errors of the engine. The bindings map InvalidRequestError and ConfigError to
// ValueError (they derive from std::invalid_argument) and EngineError to RuntimeError.
#pragma once

#include <stdexcept>

namespace fastllm {

// A request the engine refuses: empty prompt, prompt too long, bad sampling values, duplicate id.
class InvalidRequestError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// An engine configuration that cannot work (e.g. a KV pool smaller than one max-length request).
class ConfigError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// A broken internal invariant or misuse of the engine API (e.g. step() while the loop thread runs).
class EngineError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace fastllm
