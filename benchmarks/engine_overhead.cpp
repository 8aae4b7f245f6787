// Engine overhead per step (scheduler + batch plan + output update), with the FakeExecutor in its
// cheap mode and its own time subtracted. Prints µs/step; asserts nothing.
//
//   engine_overhead [steps] [sha256|fast]   (the prefix cache's hash, default sha256)
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>

#include "fastllm/engine.h"
#include "fastllm/fake_executor.h"

using namespace fastllm;
using Clock = std::chrono::steady_clock;

namespace {

// Times the wrapped executor so that its share can be taken out of the step time.
class TimedExecutor : public Executor {
 public:
  explicit TimedExecutor(const FakeExecutorConfig& c) : fake_(c) {}
  StepResult execute(const BatchPlan& plan) override {
    auto t0 = Clock::now();
    StepResult r = fake_.execute(plan);
    executor_seconds += std::chrono::duration<double>(Clock::now() - t0).count();
    last_num_seqs = plan.num_seqs;
    return r;
  }
  FakeExecutor fake_;
  double executor_seconds = 0;
  int32_t last_num_seqs = 0;
};

struct Scenario {
  const char* name;
  int num_requests;
  int max_num_seqs;
  int prompt_len;
  int num_blocks;
};

PrefixHashAlgo g_hash_algo = PrefixHashAlgo::kSha256;

void run(const Scenario& s, int steps) {
  EngineConfig cfg;
  cfg.cache.block_size = 16;
  cfg.cache.num_gpu_blocks = s.num_blocks;
  cfg.cache.enable_prefix_caching = true;
  cfg.cache.hash_algo = g_hash_algo;
  cfg.scheduler.max_num_seqs = s.max_num_seqs;
  cfg.scheduler.max_num_batched_tokens = 8192;
  cfg.scheduler.max_model_len = 4096;
  cfg.vocab_size = 32000;
  cfg.eos_token_ids = {2};
  auto exec = std::make_shared<TimedExecutor>(
      FakeExecutorConfig{s.num_blocks, 0, 16, 32000, /*verify_kv=*/false});
  Engine engine(cfg, exec);
  std::mt19937 rng(1);
  std::uniform_int_distribution<int32_t> tok(3, 31999);
  SamplingParams p;
  p.max_tokens = 1000;  // long enough to stay running through the measurement
  p.ignore_eos = true;
  for (int i = 0; i < s.num_requests; ++i) {
    std::vector<int32_t> prompt(s.prompt_len);
    for (auto& t : prompt) t = tok(rng);
    engine.add_request("r" + std::to_string(i), std::move(prompt), p);
  }
  // Warm up until the running set is all in decode.
  for (int i = 0; i < 64; ++i) engine.step();
  exec->executor_seconds = 0;
  const auto t0 = Clock::now();
  int64_t outputs = 0;
  for (int i = 0; i < steps; ++i) outputs += static_cast<int64_t>(engine.step().size());
  const double total = std::chrono::duration<double>(Clock::now() - t0).count();
  const EngineStats st = engine.stats();
  std::printf(
      "%-34s running=%4d waiting=%5d  engine %7.1f us/step  (with fake executor %7.1f "
      "us/step, %.1f outputs/step)\n",
      s.name, st.num_running, st.num_waiting, (total - exec->executor_seconds) / steps * 1e6,
      total / steps * 1e6, static_cast<double>(outputs) / steps);
}

}  // namespace

int main(int argc, char** argv) {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 500;
  if (argc > 2 && std::string(argv[2]) == "fast") g_hash_algo = PrefixHashAlgo::kFast;
  std::printf(
      "fastllm engine overhead (FakeExecutor, block_size 16, %d steps per scenario, %s prefix "
      "hash)\n",
      steps, to_string(g_hash_algo));
  run({"256 running, ctx 450-800", 256, 256, 448, 256 * 100}, steps);
  run({"256 running + 1024 waiting", 1280, 256, 448, 256 * 100}, steps);
  run({"256 running, blocks exhausted", 1280, 1024, 448, 256 * 40 + 1}, steps);
  std::printf("target: under 50 us/step at 256 running sequences\n");
  return 0;
}
