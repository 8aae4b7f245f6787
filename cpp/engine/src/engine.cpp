#include "fastllm/engine.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#if defined(__linux__)
#include <sys/eventfd.h>
#endif

#include "fastllm/batch_plan.h"
#include "mix.h"

namespace fastllm {

void EngineConfig::validate() const {
  const auto fail = [](const std::string& m) { throw ConfigError(m); };
  const int32_t bs = cache.block_size;
  if (bs != 8 && bs != 16 && bs != 32)
    fail("block_size must be 8, 16 or 32, got " + std::to_string(bs));
  if (cache.num_gpu_blocks < 2) {
    fail("num_gpu_blocks must be at least 2 (block 0 is reserved), got " +
         std::to_string(cache.num_gpu_blocks));
  }
  if (cache.num_cpu_blocks < 0) fail("num_cpu_blocks must be non-negative");
  if (scheduler.max_model_len < 2) fail("max_model_len must be at least 2");
  if (scheduler.max_num_seqs < 1) fail("max_num_seqs must be at least 1");
  if (scheduler.max_num_batched_tokens < 1) fail("max_num_batched_tokens must be at least 1");
  if (!scheduler.enable_chunked_prefill &&
      scheduler.max_num_batched_tokens < scheduler.max_model_len) {
    fail("without chunked prefill max_num_batched_tokens (" +
         std::to_string(scheduler.max_num_batched_tokens) + ") must be at least max_model_len (" +
         std::to_string(scheduler.max_model_len) + "), or a long prompt could never be scheduled");
  }
  const int64_t capacity = static_cast<int64_t>(cache.num_gpu_blocks - 1) * bs;
  if (capacity < scheduler.max_model_len) {
    fail("the KV cache holds " + std::to_string(capacity) + " tokens, fewer than max_model_len (" +
         std::to_string(scheduler.max_model_len) +
         "): give the cache more blocks or lower max_model_len");
  }
  if (vocab_size < 0) fail("vocab_size must be non-negative");
  if (max_logprobs < 0) fail("max_logprobs must be non-negative");
  speculative.validate(bs);
}

namespace {

// Output queue that wakes a consumer through a file descriptor: an eventfd on Linux, a pipe
// elsewhere. The fd is readable exactly while outputs are queued.
class OutputQueue {
 public:
  OutputQueue() {
#if defined(__linux__)
    read_fd_ = write_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (read_fd_ < 0) throw EngineError("eventfd failed");
#else
    int fds[2];
    if (pipe(fds) != 0) throw EngineError("pipe failed");
    for (int fd : fds) {
      fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
      fcntl(fd, F_SETFD, FD_CLOEXEC);
    }
    read_fd_ = fds[0];
    write_fd_ = fds[1];
#endif
  }
  ~OutputQueue() {
    close(read_fd_);
    if (write_fd_ != read_fd_) close(write_fd_);
  }

  int fd() const { return read_fd_; }

  void push(std::vector<RequestOutput>&& outputs) {
    if (outputs.empty()) return;
    std::lock_guard<std::mutex> lock(mu_);
    const bool was_empty = queue_.empty();
    for (auto& o : outputs) queue_.push_back(std::move(o));
    if (was_empty) signal();
    cv_.notify_all();
  }

  std::vector<RequestOutput> take() {
    std::lock_guard<std::mutex> lock(mu_);
    return take_locked();
  }

  std::vector<RequestOutput> wait_and_take(int timeout_ms) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, std::chrono::milliseconds(timeout_ms), [this] { return !queue_.empty(); });
    return take_locked();
  }

 private:
  void signal() {
    const uint64_t one = 1;
    ssize_t r = write(write_fd_, &one, write_fd_ == read_fd_ ? sizeof(one) : 1);
    (void)r;
  }
  void drain_fd() {
    uint64_t buf[8];
    while (read(read_fd_, buf, sizeof(buf)) > 0) {
    }
  }
  std::vector<RequestOutput> take_locked() {
    std::vector<RequestOutput> out;
    out.swap(queue_);
    drain_fd();
    return out;
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<RequestOutput> queue_;
  int read_fd_ = -1;
  int write_fd_ = -1;
};

bool contains(const std::vector<int32_t>& v, int32_t x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

}  // namespace

// The sequences of one request: [0] from add_request, [1..n-1] forked after its prompt.
struct SequenceGroup {
  std::vector<std::unique_ptr<Request>> seqs;
  int32_t num_unfinished = 1;  // sequences without their final output yet
  int32_t num_unreleased = 1;  // sequences still known to the scheduler
};

struct Engine::Impl {
  Impl(const EngineConfig& c, std::shared_ptr<Executor> e, std::shared_ptr<Executor> draft)
      : config((c.validate(), c)),
        executor(std::move(e)),
        kv(config.cache),
        scheduler(config.scheduler, kv) {
    if (!executor) throw ConfigError("Engine needs an executor");
    const SpeculativeConfig& spec = config.speculative;
    if (spec.method == SpecMethod::kDraftModel) {
      if (!draft) throw ConfigError("speculative decoding with a draft model needs its executor");
      const int32_t limit =
          spec.max_model_len > 0 ? spec.max_model_len : config.scheduler.max_model_len;
      proposer = std::make_unique<DraftModelProposer>(std::move(draft), spec.draft_cache, limit,
                                                      config.vocab_size);
    } else if (draft) {
      throw ConfigError(
          "a draft executor was given, but the speculative method is not a draft "
          "model");
    } else if (spec.method == SpecMethod::kNgram) {
      proposer = std::make_unique<NgramProposer>(spec.ngram_min, spec.ngram_max);
    }
  }

  // ---- engine-thread state ----
  EngineConfig config;
  std::shared_ptr<Executor> executor;
  KVCacheManager kv;
  Scheduler scheduler;
  BatchPlan plan;
  std::unordered_map<std::string, SequenceGroup> requests;
  int64_t step_id = 0;
  int64_t num_generated_tokens = 0;
  int64_t num_prompt_tokens_computed = 0;
  std::unique_ptr<Proposer> proposer;  // speculative decoding, when on
  DraftPlanner draft_planner;
  std::vector<Request*> drafting;  // this step's sequences with a proposal round
  std::vector<int32_t> draft_caps;
  std::vector<double> draft_acceptance;
  int64_t spec_draft_tokens = 0;
  int64_t spec_accepted_tokens = 0;
  int64_t spec_verify_steps = 0;
  int64_t spec_rejections = 0;  // verifications that rejected a draft
  double spec_draft_seconds = 0.0;
  double spec_verify_seconds = 0.0;

  // ---- input side, guarded by mu (any thread) ----
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::unique_ptr<Request>> pending_adds;
  std::vector<std::string> pending_aborts;
  std::unordered_set<std::string> live_ids;
  uint64_t next_arrival = 0;
  bool stop_requested = false;

  // ---- output side and loop thread ----
  OutputQueue outputs;
  std::thread loop_thread;
  std::atomic<bool> loop_running{false};
  mutable std::mutex stats_mu;
  EngineStats stats;

  std::vector<RequestOutput> run_step();
  // Speculative decoding: drafts for the running sequences that decode and allow them.
  void propose_drafts();
  // Runs one plan; returns why it failed (empty on success).
  std::string execute(const BatchPlan& step, StepResult& result);
  // Applies a successful step's sampled tokens and logprobs to its requests.
  void apply_result(const SchedulerOutput& sched, const BatchPlan& plan, const StepResult& result,
                    std::vector<RequestOutput>& out);
  // After a failed step: runs each of its requests alone, so a fault that one request triggers
  // fails that request only.
  void isolate_failure(const SchedulerOutput& sched, std::vector<RequestOutput>& out);
  void drain_inputs(std::vector<RequestOutput>& out);
  // Emits the sequence's final output, then releases it.
  void finish(Request* req, RequestStatus status, std::vector<RequestOutput>& out,
              std::string error = {});
  // Counts the sequence's final output; true when it was the request's last unfinished one.
  bool mark_finished(const Request* req);
  // Frees the sequence's blocks; once every sequence of its request is released the request is
  // forgotten (its id becomes usable again).
  void release(Request* req, RequestStatus status);
  // The sequence a sample row of req draws for: req itself, or, on the first-token rows of an
  // n > 1 request, child `child` (forked from req's blocks on the first such row).
  Request* sequence_for_row(Request* req, int32_t child);
  void update_stats();
  void loop();
};

namespace {

RequestOutput make_output(const Request& req) {
  RequestOutput o;
  o.request_id = req.id;
  o.seq_index = req.seq_index;
  o.cumulative_logprob = req.cumulative_logprob;
  o.num_prompt_tokens = req.num_prompt_tokens;
  o.num_output_tokens = req.num_output_tokens();
  o.num_cached_tokens = std::max(req.num_cached_tokens, 0);
  return o;
}

// The status a request reaches after its newest token, or kRunning if it goes on.
RequestStatus status_after_token(const Request& req, const std::vector<int32_t>& eos_token_ids,
                                 int32_t max_model_len) {
  const SamplingParams& p = req.params;
  const int32_t token = req.last_token();
  const int32_t num_out = req.num_output_tokens();
  if (num_out >= p.min_tokens) {
    if (!p.ignore_eos && contains(eos_token_ids, token)) return RequestStatus::kFinishedStopped;
    if (contains(p.stop_token_ids, token)) return RequestStatus::kFinishedStopped;
  }
  const int32_t max_tokens = p.max_tokens < 0 ? INT32_MAX : p.max_tokens;
  if (num_out >= max_tokens || req.num_tokens() >= max_model_len) {
    return RequestStatus::kFinishedLength;
  }
  return RequestStatus::kRunning;
}

}  // namespace

void Engine::Impl::finish(Request* req, RequestStatus status, std::vector<RequestOutput>& out,
                          std::string error) {
  RequestOutput o = make_output(*req);
  o.finished = true;
  o.request_finished = mark_finished(req);
  o.finish_reason = finish_reason_of(status);
  o.error = std::move(error);
  out.push_back(std::move(o));
  release(req, status);
}

bool Engine::Impl::mark_finished(const Request* req) {
  return --requests.at(req->id).num_unfinished == 0;
}

void Engine::Impl::release(Request* req, RequestStatus status) {
  scheduler.remove_request(req);
  if (proposer) proposer->release(req);
  req->status = status;
  auto it = requests.find(req->id);
  if (--it->second.num_unreleased > 0) return;
  {
    std::lock_guard<std::mutex> lock(mu);
    live_ids.erase(req->id);
  }
  requests.erase(it);  // destroys every sequence of the request, req included
}

Request* Engine::Impl::sequence_for_row(Request* req, int32_t child) {
  SequenceGroup& group = requests.at(req->id);
  if (!req->children_forked) {
    std::vector<Request*> children;
    for (int32_t c = 1; c < req->params.n; ++c) {
      auto seq = std::make_unique<Request>();
      seq->id = req->id;
      seq->seq_index = c;
      seq->arrival_index = req->arrival_index;
      seq->params = req->params;
      seq->params.n = 1;
      if (seq->params.seed >= 0) seq->params.seed += c;
      seq->cache_salt = req->cache_salt;
      seq->lora_id = req->lora_id;
      seq->num_prompt_tokens = req->num_prompt_tokens;
      seq->num_cached_tokens = req->num_cached_tokens;
      // req may already hold its own first token (its row comes first).
      seq->token_ids.reserve(req->token_ids.capacity());
      seq->token_ids.assign(req->token_ids.begin(),
                            req->token_ids.begin() + req->num_prompt_tokens);
      children.push_back(seq.get());
      group.seqs.push_back(std::move(seq));
      ++group.num_unfinished;
      ++group.num_unreleased;
    }
    scheduler.add_children(req, children);
  }
  return group.seqs.at(child).get();
}

void Engine::Impl::drain_inputs(std::vector<RequestOutput>& out) {
  std::vector<std::unique_ptr<Request>> adds;
  std::vector<std::string> aborts;
  {
    std::lock_guard<std::mutex> lock(mu);
    adds.swap(pending_adds);
    aborts.swap(pending_aborts);
  }
  for (auto& req : adds) {
    Request* raw = req.get();
    requests[raw->id].seqs.push_back(std::move(req));
    scheduler.add_request(raw);
  }
  std::vector<Request*> live;
  for (const std::string& id : aborts) {
    auto it = requests.find(id);
    if (it == requests.end()) continue;
    // Every unfinished sequence reports its abort; the last one releases the request.
    live.clear();
    for (auto& seq : it->second.seqs) {
      if (!is_finished(seq->status)) live.push_back(seq.get());
    }
    for (Request* seq : live) finish(seq, RequestStatus::kFinishedAborted, out);
  }
}

std::vector<RequestOutput> Engine::Impl::run_step() {
  std::vector<RequestOutput> out;
  drain_inputs(out);
  if (!scheduler.has_requests()) {
    update_stats();
    return out;
  }
  if (proposer) propose_drafts();
  const SchedulerOutput& sched = scheduler.schedule();
  if (sched.scheduled.empty()) {
    update_stats();
    return out;
  }
  build_batch_plan(sched, config.cache.block_size, config.eos_token_ids, step_id++, plan,
                   config.seed);
  const SpeculativeConfig& spec = config.speculative;
  bool verifies = false;
  for (const int32_t d : plan.num_draft_tokens) verifies = verifies || d > 0;
  if (verifies && spec.acceptance == AcceptanceMethod::kTypical) {
    plan.typical_acceptance = true;
    plan.typical_threshold = spec.typical_threshold;
    plan.typical_alpha = spec.typical_alpha;
  }

  StepResult result;
  const auto step_start = std::chrono::steady_clock::now();
  const std::string failure = execute(plan, result);
  const double step_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - step_start).count();
  if (verifies) spec_verify_seconds += step_seconds;
  if (proposer && failure.empty()) draft_planner.observe_step(plan.num_tokens, step_seconds);
  if (failure.empty()) {
    apply_result(sched, plan, result, out);
  } else if (sched.scheduled.size() > 1 && sched.block_ops.swap_out.empty()) {
    isolate_failure(sched, out);
  } else {
    // Only this step's requests are lost; requests swapped out in this step lost their copy too.
    std::vector<Request*> victims;
    for (const ScheduledRequest& s : sched.scheduled) victims.push_back(s.request);
    for (Request* p : sched.preempted) {
      if (p->status == RequestStatus::kSwapped) victims.push_back(p);
    }
    for (Request* r : victims) finish(r, RequestStatus::kFinishedError, out, failure);
  }
  update_stats();
  return out;
}

void Engine::Impl::propose_drafts() {
  const SpeculativeConfig& spec = config.speculative;
  drafting.clear();
  draft_caps.clear();
  const std::vector<Request*>& running = scheduler.running();
  for (Request* req : running) req->draft_token_ids.clear();
  if (spec.disable_by_batch_size > 0 &&
      static_cast<int32_t>(running.size()) >= spec.disable_by_batch_size) {
    return;
  }
  const int32_t max_model_len = config.scheduler.max_model_len;
  for (Request* req : running) {
    if (req->num_computed_tokens != req->num_tokens() - 1 || !req->params.speculate ||
        req->num_first_samples() != 1) {
      continue;
    }
    // a drafts accepted end in a + 1 new tokens: stay within max_tokens and max_model_len.
    int32_t cap = std::min(spec.num_speculative_tokens, max_model_len - req->num_tokens() - 1);
    if (req->params.max_tokens >= 0) {
      cap = std::min(cap, req->params.max_tokens - req->num_output_tokens() - 1);
    }
    // Sequences past speculative_max_model_len decode without drafts.
    if (spec.max_model_len > 0) cap = std::min(cap, spec.max_model_len - req->num_tokens());
    if (cap <= 0) continue;
    drafting.push_back(req);
    draft_caps.push_back(cap);
  }
  if (drafting.empty()) return;
  if (spec.adaptive) {
    // Each sequence's acceptance, shrunk towards the engine-wide rate while it has few verdicts.
    const double overall = static_cast<double>(spec_accepted_tokens + 1) /
                           static_cast<double>(spec_accepted_tokens + spec_rejections + 2);
    draft_acceptance.clear();
    for (Request* req : drafting) {
      const double a = (static_cast<double>(req->spec_accepted) + 2.0 * overall) /
                       static_cast<double>(req->spec_accepted + req->spec_rejected + 2);
      draft_acceptance.push_back(std::clamp(a, 0.01, 0.99));
    }
    draft_caps = draft_planner.plan(scheduler.num_running(), draft_acceptance, draft_caps);
  }
  const auto start = std::chrono::steady_clock::now();
  proposer->propose(drafting, draft_caps);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  spec_draft_seconds += seconds;
  if (spec.method == SpecMethod::kDraftModel) {
    const int32_t steps = *std::max_element(draft_caps.begin(), draft_caps.end());
    if (steps > 0) draft_planner.observe_draft_step(seconds / steps);
  }
}

std::string Engine::Impl::execute(const BatchPlan& step, StepResult& result) {
  try {
    result = executor->execute(step);
  } catch (const std::exception& e) {
    return std::string("executor failed: ") + e.what();
  }
  if (static_cast<int32_t>(result.sampled_token_ids.size()) != step.num_samples) {
    return "executor returned " + std::to_string(result.sampled_token_ids.size()) + " tokens for " +
           std::to_string(step.num_samples) + " sample rows";
  }
  return {};
}

void Engine::Impl::isolate_failure(const SchedulerOutput& sched, std::vector<RequestOutput>& out) {
  // Each request runs again on its own: the failed step changed no engine state, and re-running
  // a request rewrites the same KV slots with the same values. Its block copies and swap-ins
  // (the pairs whose destination is one of its blocks) run again with it: their sources are
  // read-only in a step, so each leaves its destination as the failed step's did. Swap-outs are
  // not repeatable (their source blocks may have been reused), so run_step never gets here with
  // one.
  const std::vector<ScheduledRequest> scheduled = sched.scheduled;
  const BlockOps ops = sched.block_ops;
  SchedulerOutput one;
  BatchPlan solo;
  const auto take_pairs = [](const std::vector<int32_t>& pairs, const Request& req,
                             std::vector<int32_t>& into) {
    for (size_t i = 0; i + 1 < pairs.size(); i += 2) {
      if (contains(req.block_ids, pairs[i + 1])) {
        into.push_back(pairs[i]);
        into.push_back(pairs[i + 1]);
      }
    }
  };
  for (const ScheduledRequest& s : scheduled) {
    one.clear();
    one.scheduled.push_back(s);
    one.num_scheduled_tokens = s.num_new_tokens;
    take_pairs(ops.copy, *s.request, one.block_ops.copy);
    take_pairs(ops.swap_in, *s.request, one.block_ops.swap_in);
    build_batch_plan(one, config.cache.block_size, config.eos_token_ids, step_id++, solo,
                     config.seed);
    StepResult result;
    const std::string failure = execute(solo, result);
    if (failure.empty()) {
      apply_result(one, solo, result, out);
    } else {
      finish(s.request, RequestStatus::kFinishedError, out, failure);
    }
  }
}

void Engine::Impl::apply_result(const SchedulerOutput& sched, const BatchPlan& plan,
                                const StepResult& result, std::vector<RequestOutput>& out) {
  const size_t k = static_cast<size_t>(std::max(result.num_top_logprobs, 0));
  const bool has_logprobs = result.sampled_logprobs.size() == result.sampled_token_ids.size();
  const bool has_top = k > 0 &&
                       result.top_token_ids.size() == k * result.sampled_token_ids.size() &&
                       result.top_logprobs.size() == result.top_token_ids.size();

  // Speculative sequences: their sample rows are consecutive; drafts are kept while each equals
  // the token sampled before it (spec_decode.h), so rows past the first mismatch are dropped.
  std::vector<int32_t> first_row(static_cast<size_t>(plan.num_seqs), -1);
  std::vector<int32_t> accepted(static_cast<size_t>(plan.num_seqs), 0);
  for (int32_t r = plan.num_samples; r-- > 0;) first_row[plan.sample_seq_indices[r]] = r;
  for (int32_t seq = 0; seq < plan.num_seqs; ++seq) {
    const int32_t d = plan.num_draft_tokens[seq];
    if (d == 0 || first_row[seq] < 0) continue;
    const auto& drafts = sched.scheduled[seq].request->draft_token_ids;
    int32_t a = 0;
    while (a < d && result.sampled_token_ids[first_row[seq] + a] == drafts[a]) ++a;
    accepted[seq] = a;
  }

  for (int32_t seq = 0; seq < plan.num_seqs; ++seq) {
    const ScheduledRequest& s = sched.scheduled[seq];
    Request* req = s.request;
    const int32_t prompt_part =
        std::max(0, std::min(req->num_prompt_tokens - req->num_computed_tokens, s.num_new_tokens));
    num_prompt_tokens_computed += prompt_part;
    // Draft rows count once their tokens are appended below.
    req->num_computed_tokens += s.num_new_tokens - plan.num_draft_tokens[seq];
    kv.cache_full_blocks(*req);
  }

  // Prompt logprobs go out with the request's next output (its first token) or on their own.
  std::unordered_map<Request*, RequestOutput> prompt_parts;
  if (!result.prompt_seq_indices.empty()) {
    const size_t kp = static_cast<size_t>(std::max(result.num_prompt_top_logprobs, 0));
    for (size_t e = 0; e < result.prompt_seq_indices.size(); ++e) {
      const int32_t seq = result.prompt_seq_indices[e];
      if (seq < 0 || seq >= plan.num_seqs || e >= result.prompt_token_logprobs.size()) continue;
      Request* req = sched.scheduled[seq].request;
      RequestOutput& part = prompt_parts[req];
      const size_t k = std::min(kp, static_cast<size_t>(std::max(req->params.prompt_logprobs, 0)));
      part.num_prompt_top_logprobs = static_cast<int32_t>(k);
      part.prompt_logprobs.push_back(result.prompt_token_logprobs[e]);
      if (k > 0 && result.prompt_top_token_ids.size() >= (e + 1) * kp) {
        part.prompt_top_token_ids.insert(part.prompt_top_token_ids.end(),
                                         result.prompt_top_token_ids.begin() + e * kp,
                                         result.prompt_top_token_ids.begin() + e * kp + k);
        part.prompt_top_logprobs.insert(part.prompt_top_logprobs.end(),
                                        result.prompt_top_logprobs.begin() + e * kp,
                                        result.prompt_top_logprobs.begin() + e * kp + k);
      }
    }
  }
  auto attach_prompt_part = [&prompt_parts](Request* req, RequestOutput& o) {
    auto it = prompt_parts.find(req);
    if (it == prompt_parts.end()) return;
    o.prompt_logprobs = std::move(it->second.prompt_logprobs);
    o.num_prompt_top_logprobs = it->second.num_prompt_top_logprobs;
    o.prompt_top_token_ids = std::move(it->second.prompt_top_token_ids);
    o.prompt_top_logprobs = std::move(it->second.prompt_top_logprobs);
    prompt_parts.erase(it);
  };

  std::vector<Request*> finished;
  std::vector<RequestStatus> finished_status;
  // The speculative sequence whose output this step's later rows extend (null once it finished).
  Request* extending = nullptr;
  size_t extending_at = 0;
  for (int32_t r = 0; r < plan.num_samples; ++r) {
    const int32_t seq = plan.sample_seq_indices[r];
    Request* req = sched.scheduled[seq].request;
    const int32_t j = r - first_row[seq];  // row within a speculative sequence
    const bool speculative = plan.num_draft_tokens[seq] > 0;
    if (speculative && (j > accepted[seq] || (j > 0 && extending != req))) continue;
    // The first row of an unforked n > 1 request forks its children before any of them (or the
    // parent) can finish, so request_finished is only set once all n exist.
    if (plan.sample_child_indices[r] != req->seq_index || req->num_first_samples() > 1) {
      req = sequence_for_row(req, plan.sample_child_indices[r]);
    }
    const int32_t token = result.sampled_token_ids[r];
    if (token < 0 || (config.vocab_size > 0 && token >= config.vocab_size)) {
      finished.push_back(req);
      finished_status.push_back(RequestStatus::kFinishedError);
      continue;
    }
    req->token_ids.push_back(token);
    ++num_generated_tokens;
    if (speculative && j > 0) {
      ++req->num_computed_tokens;  // the accepted draft this row's token follows
      kv.cache_full_blocks(*req);
    } else {
      out.push_back(make_output(*req));
      attach_prompt_part(req, out.back());
      extending = speculative ? req : nullptr;
      extending_at = out.size() - 1;
    }
    RequestOutput& o = out[speculative ? extending_at : out.size() - 1];
    o.new_token_ids.push_back(token);
    o.num_output_tokens = req->num_output_tokens();
    if (req->params.logprobs >= 0 && has_logprobs) {
      o.new_logprobs.push_back(result.sampled_logprobs[r]);
      req->cumulative_logprob += result.sampled_logprobs[r];
      o.cumulative_logprob = req->cumulative_logprob;
      if (has_top) {
        const size_t n = std::min(k, static_cast<size_t>(req->params.logprobs));
        o.num_top_logprobs = static_cast<int32_t>(n);
        o.top_token_ids.insert(o.top_token_ids.end(), result.top_token_ids.begin() + r * k,
                               result.top_token_ids.begin() + r * k + n);
        o.top_logprobs.insert(o.top_logprobs.end(), result.top_logprobs.begin() + r * k,
                              result.top_logprobs.begin() + r * k + n);
      }
    }
    const RequestStatus status =
        status_after_token(*req, config.eos_token_ids, config.scheduler.max_model_len);
    if (status != RequestStatus::kRunning) {
      if (status == RequestStatus::kFinishedStopped &&
          contains(req->params.stop_token_ids, token) &&
          !(!req->params.ignore_eos && contains(config.eos_token_ids, token))) {
        req->stop_token_id = token;
      }
      o.finished = true;
      o.request_finished = mark_finished(req);
      o.finish_reason = finish_reason_of(status);
      o.stop_token_id = req->stop_token_id;
      finished.push_back(req);
      finished_status.push_back(status);
      if (extending == req) extending = nullptr;
    }
  }
  for (int32_t seq = 0; seq < plan.num_seqs; ++seq) {
    const int32_t d = plan.num_draft_tokens[seq];
    if (d == 0) continue;
    Request* req = sched.scheduled[seq].request;
    spec_draft_tokens += d;
    spec_accepted_tokens += accepted[seq];
    ++spec_verify_steps;
    req->spec_accepted += accepted[seq];
    if (accepted[seq] < d) {
      ++req->spec_rejected;
      ++spec_rejections;
    }
    req->draft_token_ids.clear();
    // Blocks that hold only rejected drafts go back (a finished request frees all below).
    if (!is_finished(req->status)) kv.free_tail(*req, req->num_tokens());
  }
  // Chunks of a long prompt that produced no token yet still report their prompt logprobs.
  std::vector<Request*> prompt_only;
  for (auto& [req, part] : prompt_parts) prompt_only.push_back(req);
  for (Request* req : prompt_only) {
    RequestOutput o = make_output(*req);
    attach_prompt_part(req, o);
    out.push_back(std::move(o));
  }
  for (size_t i = 0; i < finished.size(); ++i) {
    Request* req = finished[i];
    if (finished_status[i] == RequestStatus::kFinishedError) {
      finish(req, RequestStatus::kFinishedError, out,
             "executor sampled a token outside the vocabulary");
      continue;
    }
    // The output with the final token was emitted above; release the request quietly.
    release(req, finished_status[i]);
  }
}

void Engine::Impl::update_stats() {
  EngineStats s;
  s.num_running = scheduler.num_running();
  s.num_waiting = scheduler.num_waiting();
  s.num_free_blocks = kv.device_pool().num_free_blocks();
  s.num_total_blocks = kv.device_pool().num_blocks() - 1;
  s.kv_usage = kv.device_pool().usage();
  s.prefix_queries = kv.prefix_queries();
  s.prefix_hits = kv.prefix_hits();
  s.prefix_hash_collisions = kv.prefix_hash_collisions();
  s.num_preemptions = scheduler.num_preemptions();
  s.num_steps = step_id;
  s.num_generated_tokens = num_generated_tokens;
  s.num_prompt_tokens_computed = num_prompt_tokens_computed;
  s.spec_draft_tokens = spec_draft_tokens;
  s.spec_accepted_tokens = spec_accepted_tokens;
  s.spec_verify_steps = spec_verify_steps;
  s.spec_draft_seconds = spec_draft_seconds;
  s.spec_verify_seconds = spec_verify_seconds;
  std::lock_guard<std::mutex> lock(stats_mu);
  stats = s;
}

void Engine::Impl::loop() {
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [this] {
        return stop_requested || !pending_adds.empty() || !pending_aborts.empty() ||
               scheduler.has_requests();
      });
      if (stop_requested) break;
    }
    try {
      outputs.push(run_step());
    } catch (const std::exception& e) {
      // An internal error: fail every live request rather than let the thread die silently.
      std::fprintf(stderr, "fastllm engine loop error: %s\n", e.what());
      std::vector<RequestOutput> out;
      std::vector<Request*> live;
      for (auto& [id, group] : requests) {
        for (auto& seq : group.seqs) {
          if (!is_finished(seq->status)) live.push_back(seq.get());
        }
      }
      for (Request* r : live) {
        try {
          finish(r, RequestStatus::kFinishedError, out, e.what());
        } catch (const std::exception&) {
        }
      }
      outputs.push(std::move(out));
    }
  }
}

// ---- Engine ----

Engine::Engine(const EngineConfig& config, std::shared_ptr<Executor> executor,
               std::shared_ptr<Executor> draft_executor)
    : impl_(std::make_unique<Impl>(config, std::move(executor), std::move(draft_executor))) {
  impl_->update_stats();
}

Engine::~Engine() { stop(); }

const EngineConfig& Engine::config() const { return impl_->config; }

void Engine::add_request(const std::string& request_id, std::vector<int32_t> prompt_token_ids,
                         const SamplingParams& params, uint64_t cache_salt, int32_t lora_id) {
  const EngineConfig& c = impl_->config;
  if (request_id.empty()) throw InvalidRequestError("request_id must not be empty");
  if (prompt_token_ids.empty())
    throw InvalidRequestError("the prompt must contain at least one token");
  const auto n = static_cast<int64_t>(prompt_token_ids.size());
  if (n >= c.scheduler.max_model_len) {
    throw InvalidRequestError(
        "the prompt has " + std::to_string(n) + " tokens, but max_model_len is " +
        std::to_string(c.scheduler.max_model_len) + " and at least one output token must fit");
  }
  for (int32_t t : prompt_token_ids) {
    if (t < 0 || (c.vocab_size > 0 && t >= c.vocab_size)) {
      throw InvalidRequestError("prompt token id " + std::to_string(t) +
                                " is outside the vocabulary [0, " + std::to_string(c.vocab_size) +
                                ")");
    }
  }
  params.validate(c.max_logprobs);
  if (params.n > c.scheduler.max_num_seqs) {
    throw InvalidRequestError("n (" + std::to_string(params.n) +
                              ") must not exceed max_num_seqs (" +
                              std::to_string(c.scheduler.max_num_seqs) + ")");
  }
  params.check_vocab(c.vocab_size);

  auto req = std::make_unique<Request>();
  req->id = request_id;
  req->params = params;
  if (lora_id < 0) throw InvalidRequestError("lora_id must be non-negative");
  req->lora_id = lora_id;
  // The adapter keys the prefix cache: its KV differs from the base model's for the same prompt.
  req->cache_salt =
      lora_id == 0 ? cache_salt : detail::mix64(cache_salt ^ (0x4c6f5241ull << 32 | lora_id));
  req->num_prompt_tokens = static_cast<int32_t>(n);
  req->token_ids = std::move(prompt_token_ids);
  req->token_ids.reserve(std::min<int64_t>(c.scheduler.max_model_len, n + 64));
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    if (!impl_->live_ids.insert(request_id).second) {
      throw InvalidRequestError("request id '" + request_id + "' is already in use");
    }
    req->arrival_index = impl_->next_arrival++;
    impl_->pending_adds.push_back(std::move(req));
  }
  impl_->cv.notify_one();
}

bool Engine::abort(const std::string& request_id) {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    if (impl_->live_ids.count(request_id) == 0) return false;
    impl_->pending_aborts.push_back(request_id);
  }
  impl_->cv.notify_one();
  return true;
}

std::vector<RequestOutput> Engine::step() {
  if (impl_->loop_running.load()) {
    throw EngineError("step() cannot be called while the engine loop thread runs");
  }
  return impl_->run_step();
}

bool Engine::has_unfinished_requests() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return !impl_->live_ids.empty();
}

void Engine::start() {
  if (impl_->loop_running.exchange(true)) return;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->stop_requested = false;
  }
  impl_->loop_thread = std::thread([this] { impl_->loop(); });
}

void Engine::stop() {
  if (!impl_->loop_running.load()) return;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->stop_requested = true;
  }
  impl_->cv.notify_all();
  if (impl_->loop_thread.joinable()) impl_->loop_thread.join();
  impl_->loop_running.store(false);
}

bool Engine::is_running() const { return impl_->loop_running.load(); }

int Engine::output_fd() const { return impl_->outputs.fd(); }

std::vector<RequestOutput> Engine::take_outputs() { return impl_->outputs.take(); }

std::vector<RequestOutput> Engine::wait_outputs(int timeout_ms) {
  return impl_->outputs.wait_and_take(timeout_ms);
}

EngineStats Engine::stats() const {
  std::lock_guard<std::mutex> lock(impl_->stats_mu);
  return impl_->stats;
}

}  // namespace fastllm
