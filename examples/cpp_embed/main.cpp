// Embedding the fastllm engine in a C++ program with an executor of its own.
//
// The executor here is a toy "model" that continues a counting sequence (next = last + 1) and
// records how many K/V slots it was asked to write. A real embedder would run its network here:
// write K/V at plan.slot_mapping, run attention over plan.block_tables, sample one token for each
// of plan.sample_token_indices.
#include <fastllm/engine.h>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

namespace {

class CountingExecutor : public fastllm::Executor {
 public:
  fastllm::StepResult execute(const fastllm::BatchPlan& plan) override {
    slots_written += plan.num_tokens;
    fastllm::StepResult result;
    for (int32_t r = 0; r < plan.num_samples; ++r) {
      const int32_t last = plan.token_ids[plan.sample_token_indices[r]];
      result.sampled_token_ids.push_back((last + 1) % vocab_size);
    }
    return result;
  }
  int64_t slots_written = 0;
  static constexpr int32_t vocab_size = 100;
};

}  // namespace

int main() {
  fastllm::EngineConfig config;
  config.cache.num_gpu_blocks = 64;
  config.cache.block_size = 16;
  config.scheduler.max_model_len = 512;
  config.scheduler.max_num_batched_tokens = 512;
  config.vocab_size = CountingExecutor::vocab_size;
  config.eos_token_ids = {0};

  auto executor = std::make_shared<CountingExecutor>();
  fastllm::Engine engine(config, executor);
  engine.start();  // the native loop thread

  fastllm::SamplingParams params;
  params.max_tokens = 8;
  engine.add_request("count-from-10", {8, 9, 10}, params);
  params.max_tokens = 20;
  engine.add_request("count-to-eos", {95, 96}, params);

  std::vector<std::string> finished;
  std::vector<int32_t> first, second;
  while (finished.size() < 2) {
    for (const fastllm::RequestOutput& out : engine.wait_outputs(1000)) {
      auto& dst = out.request_id == "count-from-10" ? first : second;
      dst.insert(dst.end(), out.new_token_ids.begin(), out.new_token_ids.end());
      if (out.finished) {
        finished.push_back(out.request_id);
        std::printf("%s finished (%s) with %d tokens\n", out.request_id.c_str(),
                    fastllm::to_string(out.finish_reason), out.num_output_tokens);
      }
    }
  }
  engine.stop();

  const std::vector<int32_t> want_first = {11, 12, 13, 14, 15, 16, 17, 18};
  const std::vector<int32_t> want_second = {97, 98, 99, 0};  // 0 is EOS
  std::printf("count-from-10:");
  for (int32_t t : first) std::printf(" %d", t);
  std::printf("\ncount-to-eos:");
  for (int32_t t : second) std::printf(" %d", t);
  std::printf("\nK/V slots written: %lld\n", static_cast<long long>(executor->slots_written));
  if (first != want_first || second != want_second) {
    std::printf("FAILED: unexpected tokens\n");
    return 1;
  }
  std::printf("OK\n");
  return 0;
}
