#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "fastllm/kernels/common.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FASTLLM_CPU_RELAX() _mm_pause()
#else
#define FASTLLM_CPU_RELAX() std::this_thread::yield()
#endif

namespace fastllm::kernels::cpu {
namespace {
// Pauses the caller spins for its helpers' last items before it sleeps (a few microseconds).
// Sleeping soon matters when another process or thread (a server's event loop, an HTTP client)
// preempts a helper that holds an item: the caller's CPU then goes idle, and the scheduler moves
// the preempted helper there to finish it. Spinning or yielding kept that CPU busy, and both
// waited out the preemptor's time slice: one-client serving of the MoE benchmark model went from
// ~730 to ~1000 tokens/s when the caller stopped spinning after 100 pauses instead of 20,000.
constexpr int kJoinSpins = 100;

// An idle worker spins kIdleSpins pauses for the next job before it sleeps (layers issue kernels
// back to back, and a sleeping worker costs a wake-up), yielding every kIdleYieldSpins of them. On
// two vCPUs the two compute threads otherwise hold both while the server's event loop and the HTTP
// client wait to be scheduled: the MoE benchmark model served ~5 % more tokens/s at 1 and 16
// clients with the yields (alternating A/B runs; the default model neutral to slightly faster).
constexpr int kIdleSpins = 4000;
constexpr int kIdleYieldSpins = 64;

thread_local bool t_inside_task = false;

int configured_threads() {
  if (const char* env = std::getenv("FASTLLM_CPU_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

// Jobs are published as one 64-bit claim word, (generation << 40 | count << 20 | next index), and
// items are claimed with a CAS on it. A claim therefore carries its own job's count and
// generation: a worker that wakes late (its core was busy with another process), or that read the
// word of a job that just finished, can never claim an item of a newer job or an index past its
// job's count, and the caller waits only for items that were actually claimed, not for every
// worker to check in. On a loaded machine a sleeping worker then costs nothing: the caller simply
// runs the items itself. (An earlier layout kept the count in a separate variable, published
// before the claim word: a worker holding the finished job's word could read the next job's larger
// count, claim a stale index and run the next job's task once too often, letting its caller return
// while a worker still ran an item; found by a stress test.)
constexpr int kIndexBits = 20;
constexpr uint64_t kIndexMask = (uint64_t{1} << kIndexBits) - 1;
constexpr int64_t kMaxItems = int64_t{1} << kIndexBits;  // per published job
constexpr uint64_t kGenerationMask = (uint64_t{1} << (64 - 2 * kIndexBits)) - 1;

class Pool {
 public:
  explicit Pool(int size) : size_(size) {
    for (int i = 1; i < size_; ++i) workers_.emplace_back([this] { worker_loop(); });
  }

  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
      generation_.store((generation_.load(std::memory_order_relaxed) + 1) & kGenerationMask,
                        std::memory_order_release);
    }
    wake_.notify_all();
    for (auto& worker : workers_) worker.join();
  }

  int size() const { return size_; }

  void run(int64_t count, const std::function<void(int64_t)>& task) {
    if (count > kMaxItems) {  // more items than a claim word holds: run them in ranges
      const int64_t per = (count + kMaxItems - 1) / kMaxItems;
      run((count + per - 1) / per, [&](int64_t range) {
        for (int64_t i = range * per, end = std::min(count, i + per); i < end; ++i) task(i);
      });
      return;
    }
    std::unique_lock<std::mutex> call_lock(call_mutex_, std::try_to_lock);
    if (size_ == 1 || count == 1 || t_inside_task || !call_lock.owns_lock()) {
      run_serial(count, task);
      return;
    }
    uint64_t gen;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      task_.store(&task, std::memory_order_relaxed);
      completed_.store(0, std::memory_order_relaxed);
      cancelled_.store(false, std::memory_order_relaxed);
      error_ = nullptr;
      gen = (generation_.load(std::memory_order_relaxed) + 1) & kGenerationMask;
      claim_.store(gen << (2 * kIndexBits) | static_cast<uint64_t>(count) << kIndexBits,
                   std::memory_order_release);
      generation_.store(gen, std::memory_order_release);
    }
    if (sleeping_.load(std::memory_order_acquire) > 0) wake_.notify_all();
    work(gen);
    for (int spin = 0; completed_.load(std::memory_order_acquire) < count; ++spin) {
      if (spin < kJoinSpins) {
        FASTLLM_CPU_RELAX();
        continue;
      }
      std::unique_lock<std::mutex> lock(mutex_);
      done_.wait(lock, [&] { return completed_.load(std::memory_order_acquire) >= count; });
    }
    task_.store(nullptr, std::memory_order_relaxed);
    std::lock_guard<std::mutex> lock(mutex_);
    if (error_) std::rethrow_exception(error_);
  }

 private:
  static void run_serial(int64_t count, const std::function<void(int64_t)>& task) {
    const bool was_inside = t_inside_task;
    t_inside_task = true;
    try {
      for (int64_t i = 0; i < count; ++i) task(i);
    } catch (...) {
      t_inside_task = was_inside;
      throw;
    }
    t_inside_task = was_inside;
  }

  // Claims and runs items of job `gen` until none is left (or a newer job replaced it).
  void work(uint64_t gen) {
    t_inside_task = true;
    uint64_t state = claim_.load(std::memory_order_acquire);
    for (;;) {
      if ((state >> (2 * kIndexBits)) != gen) break;
      const int64_t count = static_cast<int64_t>((state >> kIndexBits) & kIndexMask);
      const int64_t i = static_cast<int64_t>(state & kIndexMask);
      if (i >= count) break;
      if (!claim_.compare_exchange_weak(state, state + 1, std::memory_order_acq_rel,
                                        std::memory_order_acquire))
        continue;
      // The CAS read this job's word, published after its task: task_ is this job's until every
      // item, this one included, completed.
      if (!cancelled_.load(std::memory_order_relaxed)) {
        try {
          (*task_.load(std::memory_order_relaxed))(i);
        } catch (...) {
          std::lock_guard<std::mutex> lock(mutex_);
          if (!error_) error_ = std::current_exception();
          cancelled_.store(true, std::memory_order_relaxed);
        }
      }
      if (completed_.fetch_add(1, std::memory_order_acq_rel) + 1 == count) {
        std::lock_guard<std::mutex> lock(mutex_);
        done_.notify_one();
      }
      state = claim_.load(std::memory_order_acquire);
    }
    t_inside_task = false;
  }

  void worker_loop() {
    uint64_t seen = 0;
    for (;;) {
      for (int spin = 0; spin < kIdleSpins && generation_.load(std::memory_order_acquire) == seen;
           ++spin) {
        FASTLLM_CPU_RELAX();
        if (spin % kIdleYieldSpins == kIdleYieldSpins - 1) std::this_thread::yield();
      }
      if (generation_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        sleeping_.fetch_add(1, std::memory_order_acq_rel);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        sleeping_.fetch_sub(1, std::memory_order_acq_rel);
      }
      seen = generation_.load(std::memory_order_acquire);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (stopping_) return;
      }
      work(seen);
    }
  }

  const int size_;
  std::vector<std::thread> workers_;
  std::mutex call_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<uint64_t> claim_{0};
  std::atomic<int64_t> completed_{0};
  std::atomic<const std::function<void(int64_t)>*> task_{nullptr};
  std::atomic<bool> cancelled_{false};
  std::atomic<int> sleeping_{0};
  bool stopping_ = false;
  std::exception_ptr error_;
};

Pool& pool() {
  // Leaked on purpose: joining threads during static destruction at interpreter exit can hang.
  static Pool* instance = new Pool(configured_threads());
  return *instance;
}

}  // namespace

void parallel_for(int64_t count, const std::function<void(int64_t)>& task) {
  if (count <= 0) return;
  pool().run(count, task);
}

int pool_size() { return pool().size(); }

}  // namespace fastllm::kernels::cpu

namespace fastllm::kernels {
int cpu_num_threads() { return cpu::pool_size(); }
}  // namespace fastllm::kernels
